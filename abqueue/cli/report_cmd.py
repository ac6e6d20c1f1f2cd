"""`abq report`: compare the variants of an experiment from its responses (and feedback)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from abqueue.cli import options
from abqueue.errors import UsageError
from schemas.body import ENDPOINTS, NO_BODY


def moment(text: str) -> float:
    """A point in time: Unix seconds, or ISO 8601 (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2026-11-24T09:00 or 1795500000") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="per-variant outcomes and tests of each variant against the control",
        description="Reads the responses topic (or a JSONL of responses) and feedback; says first whether the "
        "traffic splits as the weights say (sample-ratio check), then what the data supports in words, then "
        "counts, rates, latency and token figures, and Welch, bootstrap (means and p50/p95) and two-proportion "
        "comparisons with lift, adjusted p-values, sample size still needed and an O'Brien-Fleming guard.",
    )
    options.add_experiment_flags(p)
    p.add_argument(
        "--input", type=Path, default=None, help="JSONL of responses (e.g. abq batch output) instead of the topic"
    )
    p.add_argument(
        "--feedback", type=Path, default=None, help="JSONL of feedback records (default: the feedback topic)"
    )
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument(
        "--mde", type=float, default=0.1, help="relative minimum detectable effect for sample sizes (default 0.1)"
    )
    p.add_argument(
        "--planned-n", type=int, default=None, help="planned requests per group (default: from the power calculation)"
    )
    p.add_argument(
        "--correction",
        choices=["holm", "bh", "none"],
        default="holm",
        help="adjust the primary metrics' p-values across metrics and variants: Holm (family-wise error, "
        "default) or Benjamini-Hochberg (false discovery rate); guardrails are not adjusted",
    )
    p.add_argument(
        "--since", type=moment, default=None, help="only requests enqueued from then (ISO 8601 or Unix seconds)"
    )
    p.add_argument("--until", type=moment, default=None, help="only requests enqueued before then")
    p.add_argument(
        "--config-version", type=int, default=None, help="only requests assigned under this live config version"
    )
    p.add_argument(
        "--endpoint",
        choices=[*ENDPOINTS, NO_BODY],
        default=None,
        help="only answers to this endpoint (none: requests without a body), so that one variant's embeddings and "
        "chats are not one latency distribution",
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts here (needs matplotlib)")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from abqueue.analysis import stats

    stats.require_extra()  # before reading a topic that may hold millions of responses
    from abqueue.analysis.report import Window, load, report, to_json, to_table

    if not 0 < args.alpha < 1 or args.mde <= 0:
        raise UsageError("--alpha must be in (0, 1) and --mde > 0, e.g. --alpha 0.05 --mde 0.1")
    exp = options.experiment(args)
    settings = options.kafka_settings(args) if args.input is None else None
    window = Window(args.since, args.until, args.config_version, args.endpoint)
    tally = load(settings, exp, args.input, args.feedback, window)
    if not tally.count:
        narrowed = " and --since/--until/--config-version/--endpoint" if window != Window() else ""
        raise UsageError(f"no responses of experiment {exp.name} to report on; check --config/--input{narrowed}")
    result = report(tally, exp, args.alpha, args.mde, args.planned_n, args.correction)
    print(to_json(result) if args.format == "json" else to_table(result))
    if args.plot:
        from abqueue.analysis.plots import write_plots

        for path in write_plots(tally, args.plot, result=result):
            print(f"chart: {path}")
    return 0
