"""`eep-hpc …`: serve, status (grow/shrink/adapt/bench come with the layers that implement them)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

import httpx

from eep_hpc.config import ConfigError, load_config


def _serve(args) -> int:
    from eep_hpc.cluster.head import Head

    overrides = {
        "serve": {"host": args.host, "port": args.port},
        "parallel": {"ranks": args.ranks, "device": args.device},
        "model": {"path": args.model},
        "control": {"run_dir": args.run_dir},
    }
    cfg = load_config(args.config, **overrides)
    head = Head(cfg)

    def ready(h):
        print(f"eep-hpc serving {h.coordinator.model_name} on {cfg.parallel.ranks} rank(s) at {h.url}  (Ctrl-C stops)",
              flush=True)

    asyncio.run(head.run(on_ready=ready))
    print("eep-hpc stopped", flush=True)
    return 0


def _status(args) -> int:
    from eep_hpc.cluster import discovery

    url = args.url or discovery.read(args.run_dir).api_url
    r = httpx.get(f"{url}/admin/state", timeout=10, headers=_auth(args))
    r.raise_for_status()
    state = r.json()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"epoch {state['epoch']}  ranks {len(state['members'])}  requests in flight {state['requests_in_flight']}")
    print(f"{'rank':>4} {'state':<9} {'host':<16} {'device':<7} {'running':>7} {'waiting':>7} {'kv used':>12}")
    for r in state["ranks"]:
        kv = f"{r['kv_blocks_used']}/{r['kv_blocks_total']}"
        print(f"{r['rank_id']:>4} {r['state']:<9} {r['host'][:16]:<16} {r['device']:<7} {r['num_running']:>7} "
              f"{r['num_waiting']:>7} {kv:>12}")
    placement = state.get("placement")
    if placement:
        offs = placement["slot_offsets"]
        for layer, row in enumerate(placement["physical_to_logical"]):
            per_rank = [row[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
            print(f"layer {layer}: " + "  ".join(f"r{i}:{s}" for i, s in enumerate(per_rank)))
    return 0


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
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="ranks, epoch, requests and expert placement of a running head")
    st.add_argument("--url", help="API URL (default: from the run dir's discovery file)")
    st.add_argument("--run-dir", default="runs/local")
    st.add_argument("--admin-token", default="")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
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
