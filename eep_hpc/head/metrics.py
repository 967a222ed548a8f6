"""Prometheus view of the cluster: ranks, epoch, and every scaling event's figures, read at scrape time.

The events' pauses and recovery times are also histograms over every event so far (the history only grows, so
their counts only grow, as Prometheus expects of a histogram)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.membership import Membership


# a commit pause is milliseconds, a recovery that waits for control.rank_timeout_s tens of seconds
EVENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)


def histogram(name: str, doc: str, samples: dict[tuple[str, ...], list[float]], labels: list[str] = ()
              ) -> HistogramMetricFamily:
    """samples: label values -> observed values; cumulative `_bucket`s over EVENT_BUCKETS, `_sum`, `_count`."""
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for label_values, values in sorted(samples.items()):
        counts = [0] * (len(EVENT_BUCKETS) + 1)
        for v in values:
            counts[bisect_left(EVENT_BUCKETS, v)] += 1  # le: a value on a bound counts in that bucket
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, EVENT_BUCKETS), "+Inf"], counts):
            cumulative += n
            buckets.append((bound, cumulative))
        family.add_metric(list(label_values), buckets, sum(values))
    return family


class ClusterCollector:
    def __init__(self, membership: Membership, exchange: EpochExchange):
        self.membership, self.exchange = membership, exchange

    def collect(self):
        m, history = self.membership, self.exchange.history
        yield GaugeMetricFamily("eep_hpc:epoch", "Epoch serving now.", value=m.epoch)
        yield GaugeMetricFamily("eep_hpc:num_ranks", "Member ranks of the serving epoch.", value=len(m.members))
        per_rank = {
            "kv_blocks_used": GaugeMetricFamily("eep_hpc:rank_kv_blocks_used", "KV blocks in use.", labels=["rank"]),
            "kv_blocks_total": GaugeMetricFamily("eep_hpc:rank_kv_blocks_total", "KV blocks.", labels=["rank"]),
            "num_running": GaugeMetricFamily("eep_hpc:rank_num_running", "Running sequences.", labels=["rank"]),
            "num_waiting": GaugeMetricFamily("eep_hpc:rank_num_waiting", "Waiting sequences.", labels=["rank"]),
            "prefix_cache_queries": CounterMetricFamily("eep_hpc:rank_prefix_cache_queries",
                                                        "Prompt tokens looked up in the prefix cache.", labels=["rank"]),
            "prefix_cache_hits": CounterMetricFamily("eep_hpc:rank_prefix_cache_hits",
                                                     "Prompt tokens found in the prefix cache.", labels=["rank"]),
            "steps": CounterMetricFamily("eep_hpc:rank_steps", "Model steps run.", labels=["rank"]),
            "graph_steps": CounterMetricFamily("eep_hpc:rank_graph_steps",
                                               "Steps replayed as CUDA graphs (idle replays included).", labels=["rank"]),
            "host_collectives": CounterMetricFamily("eep_hpc:rank_host_collectives",
                                                    "Control collectives (one per step of a multi-rank epoch).",
                                                    labels=["rank"]),
        }
        for rid in m.members:
            stats = m.ranks[rid].stats
            for field, family in per_rank.items():
                family.add_metric([str(rid)], getattr(stats, field))
        yield from per_rank.values()

        events = CounterMetricFamily("eep_hpc:scale_events", "Scaling events by kind and result.", labels=["kind", "result"])
        counts: dict[tuple[str, str], int] = {}
        for e in history:
            key = (e.kind, "done" if e.phase.name == "DONE" else "rolled_back")
            counts[key] = counts.get(key, 0) + 1
        for (kind, result), n in sorted(counts.items()):
            events.add_metric([kind, result], n)
        yield events
        done = [e for e in history if e.phase.name == "DONE"]
        for name, doc, attr in [
            ("scale_prepare_seconds", "Prepare time of the last scaling event.", "prepare_s"),
            ("scale_commit_pause_ms", "Longest inter-token gap around the last commit.", "commit_pause_ms"),
            ("scale_bytes_moved", "Expert bytes moved by the last scaling event.", "bytes_moved"),
            ("scale_gbps", "Transfer rate of the last scaling event (GB/s).", "gbps"),
        ]:
            g = GaugeMetricFamily(f"eep_hpc:{name}", doc, labels=["kind"])
            last: dict[str, float] = {}
            for e in done:
                last[e.kind] = getattr(e, attr)
            for kind, v in sorted(last.items()):
                g.add_metric([kind], v)
            yield g
        recoveries = [e for e in done if e.kind == "recover"]
        if recoveries:  # the last recovery's figures (its summary: lost, detect_s, recovery_s)
            last = recoveries[-1].summary()
            yield GaugeMetricFamily("eep_hpc:recover_ranks_lost", "Members lost that the last recovery re-formed "
                                    "without.", value=len(last["lost"]))
            yield GaugeMetricFamily("eep_hpc:recover_detect_seconds", "Last recovery: from the lost ranks' last "
                                    "message to the start of the event.", value=last["detect_s"])
            yield GaugeMetricFamily("eep_hpc:recover_seconds", "Last recovery: from the lost ranks' last message to "
                                    "serving again (detect + prepare + commit).", value=last["recovery_s"])
        pauses: dict[tuple[str, ...], list[float]] = {}
        for e in done:
            pauses.setdefault((e.kind,), []).append(e.commit_pause_ms / 1000)
        yield histogram("eep_hpc:scale_commit_pause_seconds", "Commit pause of each scaling event (longest "
                        "inter-token gap any stream saw around its commit).", pauses, ["kind"])
        summaries = [e.summary() for e in recoveries]
        yield histogram("eep_hpc:recovery_detect_time_seconds", "Each recovery: from the lost ranks' last message "
                        "to the start of the event.", {(): [s["detect_s"] for s in summaries]})
        yield histogram("eep_hpc:recovery_time_seconds", "Each recovery: from the lost ranks' last message to "
                        "serving again.", {(): [s["recovery_s"] for s in summaries]})
        yield CounterMetricFamily("eep_hpc:ranks_lost", "Members lost abruptly (re-formed without by recoveries).",
                                  value=sum(len(e.lost) for e in recoveries))
        yield CounterMetricFamily("eep_hpc:requests_migrated", "Requests moved to other ranks by scaling.",
                                  value=sum(e.requests_migrated for e in history))
