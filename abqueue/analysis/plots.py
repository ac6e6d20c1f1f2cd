"""`abq report --plot DIR`: latency CDF per variant, error rate over time, traffic split over time,
and a forest plot of every comparison's effect with its interval."""

from __future__ import annotations

from pathlib import Path

from schemas import ConfigError

MAX_POINTS = 500  # points per line over time; a long experiment gets wider buckets


def write_plots(tally, out: Path, bucket_s: int = 60, result: dict | None = None) -> list[Path]:
    """tally: the report's (analysis.tally.Tally); result: the report's, for the forest plot of effects."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("charts need matplotlib; `pip install 'abqueue[plot]'`, or leave out --plot") from None
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, g in sorted(tally.all.items()):
        # The column's uniform sample: every latency while there are at most 20,000, a random 20,000 beyond.
        lat = sorted(g.latency.summary().sample.tolist())
        if lat:
            label = f"{name} (n={g.latency.count})"
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=label)
    ax.set(xlabel="latency, enqueue to finish (s)", ylabel="share of requests", title="Latency CDF per variant")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "latency_cdf.png", plt))

    fig, (err_ax, split_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    minutes = sorted({m for _, m, _ in tally.timeline})
    start = minutes[0] if minutes else 0
    per = max(1, bucket_s // 60, -(-(minutes[-1] - start + 1) // MAX_POINTS) if minutes else 1)  # minutes per point
    n: dict[tuple[str, int], int] = {}
    e: dict[tuple[str, int], int] = {}
    for (name, minute, failed), count in tally.timeline.items():
        b = (minute - start) // per
        n[(name, b)] = n.get((name, b), 0) + count
        e[(name, b)] = e.get((name, b), 0) + count * failed
    buckets = sorted({b for _, b in n})
    totals = {b: sum(c for (_, bb), c in n.items() if bb == b) for b in buckets}
    for name in sorted(tally.all):
        x = [b * per for b in buckets]
        err_ax.plot(x, [e.get((name, b), 0) / n[(name, b)] if n.get((name, b)) else float("nan") for b in buckets],
                    marker=".", label=name)  # fmt: skip
        split_ax.plot(x, [n.get((name, b), 0) / totals[b] if totals[b] else float("nan") for b in buckets],
                      marker=".", label=name)  # fmt: skip
    err_ax.set(ylabel="error rate", title=f"Per {per} min of enqueue time")
    split_ax.set(ylabel="share of traffic", xlabel="minutes since the first request")
    for ax in (err_ax, split_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(_save(fig, out / "error_rate_and_traffic_split.png", plt))
    if result and result["comparisons"]:
        written.append(_forest(result, out / "effects_forest.png", plt))
    return written


def _forest(result: dict, path: Path, plt) -> Path:
    """Each variant's relative effect on each metric against the control, with its interval: filled
    where significant (after the correction), hollow where not."""
    from abqueue.analysis.report import GUARDRAILS, LABELS, PRIMARY

    rows = [
        (f"{name}: {LABELS[m]}", c[m])
        for name, c in result["comparisons"].items()
        for m in (*PRIMARY, *GUARDRAILS)
        if c[m]["lift"] == c[m]["lift"]  # NaN: nothing to show
    ]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    for y, (_, m) in enumerate(reversed(rows)):
        lo, hi = m["lift_ci"]
        ax.plot([100 * lo, 100 * hi], [y, y], color="tab:blue" if m["significant"] else "grey")
        ax.plot(100 * m["lift"], y, "o", color="tab:blue" if m["significant"] else "white", markeredgecolor="black")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    level = round(100 * (1 - result["alpha"]))
    ax.set(xlabel=f"effect against {result['control']}, % ({level}% intervals; filled: significant)")
    ax.set_title("Effects")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
