"""The admin routes as an operator meets them (the `api` fixture: one CPU rank): arguments that would do nothing
or something else than asked are refused with a 400 and an OpenAI-style error body, and a rebalance that would
move nothing leaves the serving epoch alone."""

from __future__ import annotations

import json
import re

import httpx

from support import ROOT


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def _epoch_and_events(api) -> tuple[int, int]:
    state = api.state()
    return state["epoch"], len(state.get("scale_events", []))


def test_grow_zero_and_empty_shrink_are_refused(api):
    before = _epoch_and_events(api)
    members = api.state()["members"]
    err = _error(httpx.post(f"{api.url}/admin/scale/grow", json={"n": 0}, timeout=60), 400)
    assert err["param"] == "n" and "greater than or equal to 1" in err["message"]
    err = _error(httpx.post(f"{api.url}/admin/scale/grow", json={"n": 1, "pools": {"x": 1}}, timeout=60), 400)
    assert "not both" in err["message"]
    err = _error(httpx.post(f"{api.url}/admin/scale/shrink", json={"rank_ids": []}, timeout=60), 400)
    assert err["param"] == "rank_ids" and "empty" in err["message"]
    assert _epoch_and_events(api) == before and api.state()["members"] == members


def test_rebalance_that_moves_nothing_keeps_the_epoch(api):
    before = _epoch_and_events(api)
    placement = api.state()["placement"]
    r = httpx.post(f"{api.url}/admin/rebalance", json={}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    # one rank, no redundant slots: every expert already has its one slot, nothing can move
    assert body["phase"] == "UNCHANGED" and body["moved"] == 0 and body["experts_moved"] == 0
    assert body["kind"] == "rebalance" and body["epoch"] == before[0] and body["commit_pause_ms"] == 0
    assert _epoch_and_events(api) == before and api.state()["placement"] == placement


def exported_names(exposition: str) -> set[str]:
    """Every series name /metrics can carry: each family from its # TYPE line, with a histogram's _bucket, _sum and
    _count (a family with no sample yet, e.g. no scaling event so far, still has its TYPE line)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def test_grafana_dashboard_reads_only_metrics_the_head_exports(api):
    dashboard = json.loads((ROOT / "docs" / "grafana" / "eep-hpc.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(exprs) >= 20 and len(set(titles)) == len(titles)
    exported = exported_names(httpx.get(f"{api.url}/metrics", timeout=10).text)
    for expr in exprs:
        used = set(re.findall(r"eep_hpc:[A-Za-z0-9_:]+", expr))
        assert used and used <= exported, (expr, used - exported)
