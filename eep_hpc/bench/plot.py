"""The timeline of a run as a PNG (matplotlib, Agg: no display needed): output tok/s and the p99 inter-token gap
per second, the ranks serving, each scale event as a shaded span (POST to answer) and a line at its end."""

from __future__ import annotations

from pathlib import Path

PLOT_HINT = "pip install 'eep-hpc[plot]' (matplotlib)"


class NoPlotting(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def write_timeline_png(result: dict, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NoPlotting(f"no timeline picture without matplotlib: {PLOT_HINT}") from None
    tl = result["timeline"]
    t = [x + 0.5 for x in tl["t_s"]]  # a bin's value at its middle
    fig, (tok, itl, ranks) = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 3, 1.4]})
    tok.plot(t, tl["output_tok_s"], color="tab:blue", marker=".", lw=1.5)
    tok.set_ylabel("output tok/s")
    tok.set_ylim(bottom=0)
    gap_t = [x for x, y in zip(t, tl["p99_itl_ms"]) if y is not None]
    itl.plot(gap_t, [y for y in tl["p99_itl_ms"] if y is not None], color="tab:red", marker=".", lw=1.5)
    itl.set_ylabel("p99 inter-token gap (ms)")
    itl.set_ylim(bottom=0)
    if tl["ranks"]:
        steps = tl["ranks"] + [[tl["duration_s"], tl["ranks"][-1][1]]]
        ranks.step([s[0] for s in steps], [s[1] for s in steps], where="post", color="tab:green", lw=2)
        ranks.set_ylim(0, max(s[1] for s in steps) + 1)
    else:
        ranks.text(0.5, 0.5, "not known (no access to /admin/state)", transform=ranks.transAxes, ha="center")
    ranks.set_ylabel("ranks")
    ranks.yaxis.get_major_locator().set_params(integer=True)
    ranks.set_xlabel("seconds since the first request  (shaded: a scale event from its request to its answer; "
                     "dashed: its end)")
    ranks.set_xlim(0, max(tl["duration_s"], 1))
    for e in tl["events"]:
        color = "tab:purple" if e["phase"] == "DONE" else "tab:gray"
        for ax in (tok, itl, ranks):
            ax.axvspan(e["t_s"], e["t_done_s"], color=color, alpha=0.08)
            ax.axvline(e["t_done_s"], color=color, ls="--", lw=1)
        label = f"{e['kind']} {e['from_ranks']}→{e['to_ranks']}"
        label += f"\npause {e['commit_pause_ms']:.0f} ms" if e["phase"] == "DONE" else f"\n{str(e['phase']).lower()}"
        right = e["t_done_s"] > 0.85 * max(tl["duration_s"], 1)  # near the right edge: the label goes to its left
        tok.annotate(label, xy=(e["t_done_s"], 1.0), xycoords=("data", "axes fraction"),
                     xytext=(-3 if right else 3, -3), textcoords="offset points", va="top",
                     ha="right" if right else "left", fontsize=8, color=color)
    for ax in (tok, itl, ranks):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.get('model', '')} on {result.get('device', '')}: {result.get('workload', '')}\n"
                 f"{result.get('completed', 0)} requests, {result.get('failed', 0)} failed, "
                 f"{result.get('output_throughput', 0):.0f} output tok/s overall", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
