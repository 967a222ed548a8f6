"""`eep-hpc …`: serve, status, grow, shrink, rebalance, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx

from eep_hpc.config import ConfigError, load_config
from eep_hpc.head.events import describe_event
from eep_hpc.logs import LEVELS, setup_logging


def parse_setting(item: str) -> tuple[str, str, object]:
    """--set SECTION.KEY=VALUE -> (section, key, value); the value is read as TOML (512, 0.9, true, "text"),
    and as a plain string when it is not valid TOML."""
    import tomllib

    name, eq, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise ConfigError(f"--set wants SECTION.KEY=VALUE (e.g. engine.max_num_seqs=512), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def _fast_event_loop():
    """uvloop's event loop where it is installed, else asyncio's: every streamed token crosses the head's loop
    (a socket write and a few callbacks per token and stream; results/README.md, "The head's funnel")."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _serve(args) -> int:
    overrides = {
        "serve": {"host": args.host, "port": args.port},
        "parallel": {"ranks": args.ranks, "device": args.device, "launcher": args.launcher},
        "model": {"path": args.model},
        "control": {"run_dir": args.run_dir, "host": args.control_host},
    }
    for item in args.set or []:
        section, key, value = parse_setting(item)
        overrides.setdefault(section, {})[key] = value
    cfg = load_config(args.config, **overrides)  # config mistakes end here, before the model code is even imported

    from eep_hpc.gc_heap import freeze_startup_heap, warn_on_long_pauses
    from eep_hpc.head.main import Head, StartupError

    try:
        head = Head(cfg)  # a busy port or an unusable model ends here, before any rank starts
    except StartupError as e:
        print(f"eep-hpc: {e}", file=sys.stderr)
        return 2
    head.server.access_log = args.access_log

    def ready(h):
        # the head is this process's whole life: its start-up heap leaves the collector's walks (gc_heap.py)
        freeze_startup_heap("head")
        warn_on_long_pauses("head")
        print(f"eep-hpc serving {h.coordinator.model_name} on {cfg.parallel.ranks} rank(s) at {h.url}  (Ctrl-C stops)",
              flush=True)
        if h.api_key_file:
            print(f"API key required: 'Authorization: Bearer <key>', the key in {h.api_key_file} "
                  f"(eep-hpc bench --run-dir {cfg.control.run_dir} finds it)", flush=True)

    with asyncio.Runner(loop_factory=_fast_event_loop()) as runner:
        runner.run(head.run(on_ready=ready))
    print("eep-hpc stopped", flush=True)
    return 0


def _status(args) -> int:
    url = _head_url(args)
    r = httpx.get(f"{url}/admin/state", timeout=10, headers=_auth(args))
    if r.status_code != 200:
        return _refused(r)
    state = r.json()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"epoch {state['epoch']}  ranks {len(state['members'])}  requests in flight {state['requests_in_flight']}")
    adapt = state.get("adapt")
    if adapt:
        print(_adapt_line(adapt))
    if state.get("scaling"):
        scaling = state["scaling"]
        got, total = scaling.get("reads_received", 0), scaling.get("reads_total", 0)
        unit, size = ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)
        reads = f", weight reads {got / size:.2f} of {total / size:.2f} {unit} ({got / total:.0%})" if total else ""
        print(f"scaling now: {scaling['kind']} to epoch {scaling['epoch']} ({scaling['phase'].lower()}{reads})")
    print(_rank_table(state["ranks"]))
    placement = state.get("placement")
    if placement:
        offs = placement["slot_offsets"]
        for layer, row in enumerate(placement["physical_to_logical"]):
            per_rank = [row[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
            # labelled by rank id (what shrink --rank takes), not by position in the epoch
            print(f"layer {layer}: " + "  ".join(f"r{rid}:{s}" for rid, s in zip(state["members"], per_rank)))
    for e in state.get("scale_events", [])[-5:]:
        print(describe_event(e))
    return 0


_COLUMNS = ("RANK", "STATE", "NODE", "JOBID", "DEVICE", "RUNNING", "WAITING", "KV USE", "SLOTS", "STEPS", "GRAPHS")


def _rank_table(ranks: list[dict]) -> str:
    """The live ranks by id, one row each, like squeue: a failed or exited rank is no longer listed."""
    rows = [_COLUMNS]
    for r in sorted(ranks, key=lambda r: r["rank_id"]):
        used, total = r["kv_blocks_used"], r["kv_blocks_total"]
        kv = f"{used}/{total} {100 * used / total:.0f}%" if total else "-"
        steps = r.get("steps", 0)
        graphs = f"{100 * r.get('graph_steps', 0) / steps:.0f}%" if steps else "-"  # share of steps replayed
        rows.append((str(r["rank_id"]), r["state"], r["host"] or "-", str(r["job_id"] or "-"), r["device"] or "-",
                     str(r["num_running"]), str(r["num_waiting"]), kv, str(r.get("expert_slots", 0) or "-"),
                     str(steps), graphs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    left = {"STATE", "NODE", "JOBID", "DEVICE"}  # text left-aligned, numbers right-aligned
    return "\n".join(" ".join(cell.ljust(w) if name in left else cell.rjust(w)
                              for cell, w, name in zip(row, widths, _COLUMNS)).rstrip() for row in rows)


def _admin_post(args, path: str, body: dict) -> int:
    url = _head_url(args)
    r = httpx.post(f"{url}{path}", json=body, timeout=args.timeout, headers=_auth(args))
    return _report(r)


def _refused(r: httpx.Response) -> int:
    """The head's error as one line (its OpenAI-shaped message, else the status), exit 1."""
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {r.status_code} {r.reason_phrase}"
    if r.status_code == 401:
        message += " (--admin-token TOKEN, or --run-dir of the head, which finds it)"
    print(f"eep-hpc: {message}", file=sys.stderr)
    return 1


def _report(r: httpx.Response) -> int:
    if r.status_code != 200:
        return _refused(r)
    data = r.json()
    if data.get("phase") == "SUBMITTED":  # grow --no-wait
        print(f"{data['kind']}: rank(s) {_ids(data['rank_ids'])} submitted; they join when their jobs start "
              f"(eep-hpc status shows them)")
    else:
        print(describe_event(data) if "from_ranks" in data else json.dumps(data))
    return 0


def _ids(ids: list[int]) -> str:
    return ", ".join(str(r) for r in ids)


def _adapt_line(a: dict) -> str:
    line = f"adapt {'on' if a['enabled'] else 'off'}: {a['min_ranks']}..{a['max_ranks']} ranks"
    return line + (f" (last: {a['last']})" if a.get("last") else "")


def _grow(args) -> int:
    if args.n is not None and args.n < 1:
        print(f"eep-hpc: grow needs N >= 1 ranks to add, got {args.n}", file=sys.stderr)
        return 2
    body: dict = {"wait": not args.no_wait}
    if args.n is not None:
        body["n"] = args.n
    pools = args.pool or []
    if any(":" in p for p in pools):  # --pool big:2 --pool small:1: one heterogeneous job
        try:
            body["pools"] = {name: int(count) for name, count in (p.split(":", 1) for p in pools)}
        except ValueError:
            print("eep-hpc: --pool takes NAME or NAME:COUNT", file=sys.stderr)
            return 2
        if args.n is not None or any(c < 1 for c in body["pools"].values()):
            print("eep-hpc: with --pool NAME:COUNT give no N, and each COUNT >= 1", file=sys.stderr)
            return 2
    elif pools:
        body["pool"] = pools[-1]
    if args.no_wait:
        return _admin_post(args, "/admin/scale/grow", body)
    from eep_hpc.join_progress import grow_watching

    n = sum(body["pools"].values()) if "pools" in body else body.get("n", 1)
    url = _head_url(args)
    return _report(asyncio.run(grow_watching(url, _auth(args), body, args.timeout, n)))


def _shrink(args) -> int:
    chosen = [x for x in (args.n, args.rank, args.node) if x is not None]
    if len(chosen) != 1:
        print("eep-hpc: shrink needs exactly one of N, --rank R, --node HOST", file=sys.stderr)
        return 2
    if args.n is not None and args.n < 1:
        print(f"eep-hpc: shrink needs N >= 1 ranks to remove, got {args.n}", file=sys.stderr)
        return 2
    body = {"n": args.n} if args.n is not None else {"rank_ids": args.rank} if args.rank else {"node": args.node}
    return _admin_post(args, "/admin/scale/shrink", body)


def _adapt(args) -> int:
    if not 1 <= args.min <= args.max:
        print(f"eep-hpc: adapt needs 1 <= --min <= --max, got --min {args.min} --max {args.max}", file=sys.stderr)
        return 2
    url = _head_url(args)
    body = {"min": args.min, "max": args.max, "enabled": not args.off}
    r = httpx.post(f"{url}/admin/adapt", json=body, timeout=30, headers=_auth(args))
    if r.status_code != 200:
        return _refused(r)
    print(_adapt_line(r.json()))
    return 0


def _rebalance(args) -> int:
    return _admin_post(args, "/admin/rebalance", {})


def _head_url(args) -> str:
    """--url, else the discovery file of the run dir (which also says where the admin token is)."""
    from eep_hpc.cluster import discovery

    if args.url:
        return args.url
    info = discovery.read(args.run_dir)
    args.admin_token = args.admin_token or discovery.read_token(info.admin_token_file)
    return info.api_url


def _auth(args) -> dict:
    token = getattr(args, "admin_token", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eep-hpc", description="Elastic expert-parallel MoE serving on Slurm/HPC")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the head (API + coordinator) with local ranks")
    s.add_argument("--config", help="configs/NAME.toml (default: embedded tiny CPU model)")
    s.add_argument("--model", help="Hugging Face-format model directory, or 'tiny'")
    s.add_argument("--ranks", type=int, help="number of ranks (expert-parallel size)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--run-dir", help="folder for logs and the discovery file (default runs/local)")
    s.add_argument("--control-host", help="address ranks reach the head at (on a cluster: this node's name)")
    s.add_argument("--launcher", choices=["local", "slurm"], help="where new ranks run")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set engine.max_num_seqs=512 (repeatable)")
    s.add_argument("--access-log", action="store_true",
                   help="log a line per HTTP request (uvicorn's access log; off by default, /metrics counts them)")
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="ranks, epoch, requests and expert placement of a running head")
    st.add_argument("--url", help="API URL (default: from the run dir's discovery file)")
    st.add_argument("--run-dir", help="the head's run dir (default: $EEP_RUN_DIR, else the newest runs/*/head.json)")
    st.add_argument("--admin-token", default="")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    def admin_parser(name: str, help: str, func):
        a = sub.add_parser(name, help=help)
        a.add_argument("--url", help="API URL (default: from the run dir's discovery file)")
        a.add_argument("--run-dir", help="the head's run dir (default: $EEP_RUN_DIR, else the newest runs/*/head.json)")
        a.add_argument("--admin-token", default="")
        a.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the event to finish")
        a.set_defaults(func=func)
        return a

    g = admin_parser("grow", "add N ranks to the serving group while it serves", _grow)
    g.add_argument("n", type=int, nargs="?", help="number of ranks to add, >= 1 (default 1; with one --pool NAME)")
    g.add_argument("--pool", action="append", help="NAME (Slurm node shape), or NAME:COUNT repeated for one "
                                                   "heterogeneous job, e.g. --pool big:2 --pool small:1")
    g.add_argument("--no-wait", action="store_true", help="return once submitted; ranks join when Slurm starts them")
    sh = admin_parser("shrink", "drain and remove ranks (experts and requests move to the survivors)", _shrink)
    sh.add_argument("n", type=int, nargs="?", help="number of ranks to remove (the newest)")
    sh.add_argument("--rank", type=int, action="append", help="remove this rank id (repeatable)")
    sh.add_argument("--node", help="remove every rank on this host")
    admin_parser("rebalance", "re-place experts by the load counted so far", _rebalance)
    ad = admin_parser("adapt", "scale automatically between --min and --max ranks", _adapt)
    ad.add_argument("--min", type=int, required=True)
    ad.add_argument("--max", type=int, required=True)
    ad.add_argument("--off", action="store_true", help="stop adapting (keeps the current ranks)")

    from eep_hpc.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from eep_hpc.bench.head_bench import add_head_bench_parser

    add_head_bench_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--log-level", choices=LEVELS, default=None,
                             help="log from this level on (default: $EEP_HPC_LOG_LEVEL, else info; serve passes it "
                                  "on to its ranks); debug adds a line per HTTP call")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("%(asctime)s %(name)s %(levelname)s %(message)s", args.log_level)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"eep-hpc: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"eep-hpc: cannot reach the head: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
