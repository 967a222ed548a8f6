"""`eep-hpc bench`: options, the target (URL or discovery file), and one run from first request to result file.

Exit code: 0 when every request succeeded (and the scale plan, if any, ran to its end), 1 otherwise, 2 for a
benchmark that cannot start (no head found, bad options, a first test request that fails).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx

from eep_hpc.bench import client as bench_client
from eep_hpc.bench.dataset import BenchRequest, random_requests
from eep_hpc.bench.driver import run_load
from eep_hpc.bench.metrics import summarize
from eep_hpc.bench.plot import NoPlotting, write_timeline_png
from eep_hpc.bench.progress import Progress
from eep_hpc.bench.report import MAX_ERRORS, default_path, device_name, table, write_result
from eep_hpc.bench.scale_plan import ScalePlan, event_line, parse_plan
from eep_hpc.bench.timeline import timeline

ADMIN_TIMEOUT_S = 900.0  # one scale event (a grow starts processes and moves experts)


class BenchError(RuntimeError):
    """The benchmark cannot start; the message says why."""


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="load generator against a running API (like `vllm bench serve`), with scale plans",
        description="Send random token-id prompts of exact lengths to /v1/completions (streamed), measure TTFT, "
                    "TPOT, ITL and end-to-end latency, optionally grow/shrink the serving group while the load "
                    "runs, print a summary table and write a JSON result.")
    t = b.add_argument_group("target")
    t.add_argument("--url", help="API base URL (default: from the run dir's discovery file)")
    t.add_argument("--run-dir", help="where the head wrote head.json (default: $EEP_RUN_DIR, else the newest "
                                      "runs/*/head.json)")
    t.add_argument("--model", help="model id (default: the first one GET /v1/models lists)")
    t.add_argument("--api-key", default="",
                   help="sent as 'Authorization: Bearer' to /v1/* (default: the discovery file's key file)")
    t.add_argument("--admin-token", default="",
                   help="sent as 'Authorization: Bearer' to /admin/* (default: the discovery file's token file)")
    d = b.add_argument_group("dataset (random token ids)")
    d.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default %(default)s)")
    d.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (default %(default)s)")
    d.add_argument("--random-output-len", type=int, default=128, help="output tokens (default %(default)s)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from len*(1-r)..len*(1+r), 0 <= r < 1 (default %(default)s)")
    d.add_argument("--vocab-size", type=int, default=500,
                   help="token ids are drawn below this when /v1/models does not report a vocab size "
                        "(default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default %(default)s)")
    l = b.add_argument_group("load")
    l.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends all at once (default %(default)s)")
    l.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    l.add_argument("--timeout", type=float, default=1800.0, help="seconds one request may take (default %(default)s)")
    l.add_argument("--http-client", choices=["lean", "httpx"], default="lean",
                   help="what sends the requests: plain keep-alive connections (lean; httpx for https URLs) or "
                        "httpx, which costs ~0.7 ms of the client's loop per request (bench/client.py) "
                        "(default %(default)s)")
    s = b.add_argument_group("scale plan")
    s.add_argument("--scale-plan", default="",
                   help="rank counts to move through while the load runs, e.g. 1,2,4,2,1; the load keeps going "
                        "past --num-prompts until the plan is done")
    s.add_argument("--scale-interval", type=float, default=5.0, help="seconds before each step (default %(default)s)")
    r = b.add_argument_group("result")
    r.add_argument("--result-file", help="JSON result path (default: <run dir>/bench/<timestamp>-<model>.json, with "
                                          "the run dir as for --run-dir, also when --url is given)")
    r.add_argument("--timeline", metavar="PATH.png",
                   help="the run's timeline picture: output tok/s and p99 inter-token gap per second, ranks, scale "
                        "events (default: next to the JSON, same name with .png; needs matplotlib: "
                        "pip install 'eep-hpc[plot]')")
    r.add_argument("--dtype-label", help="dtype to record (default: GET /admin/state's, else 'unknown')")
    b.set_defaults(func=run_bench)
    return b


def run_bench(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(bench(args))
    except (BenchError, FileNotFoundError, ValueError) as e:
        print(f"eep-hpc bench: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"eep-hpc bench: cannot reach the head: {e}", file=sys.stderr)
        return 2


def target(args: argparse.Namespace) -> tuple[str, str]:
    """(API URL, admin token): the options, else the discovery file of --run-dir (args.api_key too)."""
    if args.url:
        return args.url.rstrip("/"), args.admin_token
    from eep_hpc.cluster.discovery import read, read_token

    info = read(args.run_dir)
    args.api_key = args.api_key or read_token(info.api_key_file)
    return info.api_url.rstrip("/"), args.admin_token or read_token(info.admin_token_file)


def run_dir(args: argparse.Namespace) -> Path:
    """Where the result goes without --result-file: the run dir of --run-dir, else the one `eep-hpc status` would
    use ($EEP_RUN_DIR, else the newest runs/*/ with a head.json, else runs/local), also when --url names the head."""
    from eep_hpc.cluster.discovery import find_run_dir

    return Path(args.run_dir) if args.run_dir else find_run_dir()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def server_info(api: httpx.AsyncClient, admin: httpx.AsyncClient, url: str) -> tuple[dict, dict]:
    """(model cards by id, in the order /v1/models lists them; GET /admin/state, or {} when not allowed)."""
    r = await api.get(f"{url}/v1/models")
    if r.status_code != 200:
        raise BenchError(f"GET /v1/models answered HTTP {r.status_code}: {r.text[:300]}")
    cards = r.json().get("data") or []
    if not cards:
        raise BenchError("GET /v1/models lists no model")
    s = await admin.get(f"{url}/admin/state")
    return {c["id"]: c for c in cards}, (s.json() if s.status_code == 200 else {})


def workload(args: argparse.Namespace) -> str:
    text = f"random {args.random_input_len} in / {args.random_output_len} out, {args.num_prompts} prompts"
    if args.random_range_ratio:
        text += f", range ratio {args.random_range_ratio}"
    if args.scale_plan:
        text += f", scale plan {args.scale_plan} every {args.scale_interval:g} s"
    return text


def gpu_ranks(state: dict) -> int:
    members = set(state.get("members") or [])
    return sum(1 for r in state.get("ranks") or [] if r.get("rank_id") in members
               and str(r.get("device", "")).startswith("cuda"))


async def bench(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be at least 1")
    if args.request_rate <= 0:
        raise BenchError("--request-rate must be positive (inf: all at once)")
    plan = parse_plan(args.scale_plan) if args.scale_plan else []
    url, admin_token = target(args)
    timeout = httpx.Timeout(args.timeout, connect=30.0, pool=None)
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency or 100)
    async with (httpx.AsyncClient(timeout=timeout, limits=limits, headers=bearer(args.api_key)) as api,
                httpx.AsyncClient(timeout=ADMIN_TIMEOUT_S, headers=bearer(admin_token)) as admin):
        cards, state = await server_info(api, admin, url)
        model = args.model or next(iter(cards))
        card = cards.get(model, {})
        if plan and "members" not in state:
            raise BenchError("a scale plan needs GET /admin/state (give --admin-token)")
        vocab = int(card.get("vocab_size") or args.vocab_size)
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, vocab, args.seed)
        longest = max(r.input_len + r.output_len for r in requests)
        if card.get("max_model_len") and longest > card["max_model_len"]:
            raise BenchError(f"prompt + output of up to {longest} tokens exceeds the model's max_model_len "
                             f"{card['max_model_len']}")
        lean = None
        if args.http_client == "lean" and url.startswith("http://"):
            lean = bench_client.LeanClient(url, bearer(args.api_key), args.timeout)
            send = partial(lean.send, model)
        else:
            send = partial(bench_client.send, api, url, model)

        first = await send(BenchRequest(requests[0].prompt, min(2, requests[0].output_len)))
        if not first.success:
            raise BenchError(f"the first test request failed: {first.error}")
        print(f"bench: {workload(args)} against {model} at {url}"
              + (f", request rate {args.request_rate:g}/s" if math.isfinite(args.request_rate) else "")
              + (f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""), file=sys.stderr)

        progress = Progress(args.num_prompts)
        plan_task = None
        if plan:
            def on_event(e: dict) -> None:
                progress.note(f"bench: {event_line(e)}")
                progress.show(force=True)

            scale = ScalePlan(admin, url, plan, args.scale_interval, on_event)
            plan_task = asyncio.ensure_future(scale.run())
        try:
            outcome = await run_load(send, requests, args.request_rate, args.max_concurrency, plan_task, progress,
                                     args.seed)
        finally:
            progress.close()
            if plan_task is not None and not plan_task.done():
                plan_task.cancel()
            if lean is not None:
                lean.close()
        plan_error = ""
        if plan_task is not None and not plan_task.cancelled() and plan_task.exception() is not None:
            plan_error = f"{type(plan_task.exception()).__name__}: {plan_task.exception()}"
            print(f"eep-hpc bench: the scale plan stopped: {plan_error}", file=sys.stderr)

    metrics = summarize(outcome.results, outcome.duration, args.request_rate, args.max_concurrency)
    errors = [r.error for r in outcome.results if not r.success]
    events = scale.events if plan else []
    shift = scale.start - outcome.start if plan else 0.0  # the plan's clock onto the run's
    on_run_clock = [{**e, "t_s": round(e["t_s"] + shift, 3), "t_done_s": round(e["t_done_s"] + shift, 3)}
                    for e in events]
    result = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "model": model,
        "dtype": args.dtype_label or state.get("dtype") or "unknown",
        "quantization": state.get("quantization") or "none",
        "backend": state.get("backend") or "unknown",
        "device": device_name(),
        "num_gpus": gpu_ranks(state),
        "num_ranks": len(state.get("members") or []),
        "workload": workload(args),
        "http_client": "lean" if lean is not None else "httpx",
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        **metrics,
        "failed_requests": errors[:MAX_ERRORS],
        "scale_plan": plan,
        "scale_events": events,
        "scale_plan_error": plan_error,
        "timeline": timeline(outcome.results, outcome.start, outcome.duration, len(state.get("members") or []) or None,
                             on_run_clock),
    }
    path = write_result(result, args.result_file or default_path(run_dir(args), model))
    print(table(result))
    print(f"result written to {path}")
    try:
        print(f"timeline written to {write_timeline_png(result, args.timeline or path.with_suffix('.png'))}")
    except NoPlotting as e:
        print(f"bench: {e}", file=sys.stderr)
    return 0 if metrics["failed"] == 0 and not plan_error else 1
