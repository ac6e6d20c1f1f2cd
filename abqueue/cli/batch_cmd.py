"""`abq batch`: submit a JSONL file, write results as they arrive, resume by rerunning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="submit a JSONL file of requests; results to a JSONL file; resumable",
        description="Accepts abqueue request lines or OpenAI Batch lines ({custom_id, method, url, body}). "
        "Rerun the same command to resume: ids that already have a result are skipped.",
    )
    options.add_experiment_flags(p)
    p.add_argument("input", type=Path, help="input JSONL")
    p.add_argument("--out", type=Path, required=True, help="results JSONL (appended to on resume)")
    p.add_argument("--errors", type=Path, default=None, help="failures JSONL (default OUT's name + .errors.jsonl)")
    p.add_argument(
        "--rate", type=float, default=None, help="requests per second at most (default: as fast as Kafka takes them)"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for results after the last submit (default 600)"
    )
    p.add_argument(
        "--reply-to", default=None, help="read results from this topic instead of the experiment's responses topic"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from producers.batch import BatchJob, summary_line

    if not args.input.is_file():
        raise UsageError(f"input {args.input} does not exist; pass a JSONL file")
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be > 0")
    job = BatchJob(
        options.kafka_settings(args),
        options.experiment(args),
        args.input,
        args.out,
        args.errors,
        rate=args.rate,
        timeout_s=args.timeout,
        reply_topic=args.reply_to,
        progress=not args.no_progress,
    )
    s = job.run()
    print(summary_line(s, args.out))
    if s.missing:
        print(
            f"abq: {s.missing} requests got no result within {args.timeout:g}s; rerun the same command to collect them",
            file=sys.stderr,
        )
        return 1
    return 0
