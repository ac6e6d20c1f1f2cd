"""The simulator's PNG chart: backlog, replicas and wait over time, one line per setting compared."""

from __future__ import annotations

from pathlib import Path

from abqueue.analysis.stats import weighted_percentile
from schemas import ConfigError


def require_matplotlib():
    """matplotlib's pyplot, or a one-line ConfigError: checked before any work, not after a whole
    simulation has run."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("charts need matplotlib; `pip install 'abqueue[plot]'`, or leave out --png") from None
    return plt


def write_png(results, path: Path, label: str | None) -> Path:
    plt = require_matplotlib()
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for r in results:
        name = f"{label}={getattr(r.settings, label)}" if label else "simulated"
        t = [row["t"] / 60 for row in r.timeline]
        axes[0].plot(t, [row["backlog"] for row in r.timeline], label=name)
        axes[1].step(t, [row["replicas"] for row in r.timeline], where="post", label=name)
        axes[2].plot(*_per_minute(r), label=name)
    axes[0].set_ylabel("backlog (requests)")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("wait p95 per minute (s)")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_minute(result) -> tuple[list[float], list[float]]:
    """The p95 wait of the requests served in each minute."""
    minutes: dict[int, list[tuple[float, int]]] = {}
    for served_at, wait, n in result.waits:
        minutes.setdefault(served_at // 60, []).append((wait, n))
    keys = sorted(minutes)
    return [k for k in keys], [weighted_percentile(minutes[k], 95) for k in keys]
