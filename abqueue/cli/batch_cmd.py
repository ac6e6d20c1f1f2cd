"""`abq batch`: submit a JSONL file, write results as they arrive, resume by rerunning."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from abqueue.cli import options
from abqueue.cli.exits import ExitCode
from abqueue.errors import UsageError

TIMED_OUT = ExitCode(
    1,
    "some requests got no result within --timeout; those that came are kept: rerun the same command to collect the rest",
)
SOME_LINES_INVALID = ExitCode(
    3,
    "every line that could be submitted has its result, but some lines could not be submitted; their line numbers and reasons are in the errors file",
)


def register(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="submit a JSONL file of requests; results to a JSONL file; resumable",
        description="Accepts abqueue request lines or OpenAI Batch lines ({custom_id, method, url, body}). "
        "Rerun the same command to resume: ids that already have a result are skipped. Exit 0: every line "
        "has a result; exit 1: some got none in time (rerun to collect them); exit 2: a usage or connection "
        "error; exit 3: every line is done but some could not be submitted (see the errors file); "
        "exit 130: interrupted (rerun to resume).",
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
        "--reply-to",
        default=None,
        help="have workers write results to this topic too (one of the experiment's reply_topics) and read them there",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=10_000,
        help="requests submitted and not yet answered at most; bounds the job's memory (default 10000)",
    )
    p.add_argument(
        "--resubmit",
        action="store_true",
        help="submit again what an earlier run had in Kafka but got no result for (e.g. its topic was emptied)",
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
    if args.max_pending < 1:
        raise UsageError("--max-pending must be at least 1")
    # Ctrl-C: kafka-python's I/O loop runs tasks in the caller's thread and logs, then drops, any
    # exception a task raises, KeyboardInterrupt included, so the job would wait out --timeout. The
    # flag outlives a dropped KeyboardInterrupt: the job stops at its next check (within a second).
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
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
        max_pending=args.max_pending,
        resubmit=args.resubmit,
        stop=interrupted.is_set,
    )
    args.interrupt_hint = f"results so far are in {args.out}; rerun the same command to resume"
    s = job.run()
    if interrupted.is_set():
        raise KeyboardInterrupt
    print(summary_line(s, args.out))
    if s.missing:
        print(
            f"abq: {s.missing} requests got no result within {args.timeout:g}s; rerun the same command to collect them",
            file=sys.stderr,
        )
        return TIMED_OUT
    if s.invalid:
        print(f"abq: {s.invalid} lines could not be submitted; their reasons are in {job.errors_path}", file=sys.stderr)
        return SOME_LINES_INVALID
    return 0
