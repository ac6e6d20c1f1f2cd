"""Entry point of `abq`. Every user-facing error ends as one line naming the problem and the fix."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from abqueue.cli import (
    batch_cmd,
    demo_cmd,
    deploy_cmd,
    evaluate_cmd,
    experiment_cmd,
    kafka_cmd,
    keda_cmd,
    report_cmd,
    rollout_cmd,
    schemas_cmd,
    submit_cmd,
    worker_cmd,
)
from abqueue.errors import AbqError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="abq", description="Queue-based LLM inference for A/B-tested model rollouts, on Kafka and vLLM."
    )
    p.add_argument(
        "--log-level", default=os.environ.get("ABQ_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (env ABQ_LOG_LEVEL)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (
        demo_cmd,
        worker_cmd,
        submit_cmd,
        batch_cmd,
        experiment_cmd,
        rollout_cmd,
        report_cmd,
        evaluate_cmd,
        kafka_cmd,
        keda_cmd,
        deploy_cmd,
        schemas_cmd,
    ):
        module.register(sub)
    return p


def _kafka_without_tracebacks(record: logging.LogRecord) -> bool:
    """kafka-python logs a refused or dropped connection with its traceback: a stack of its own
    socket code above the one line that names the problem. Below DEBUG, keep the line."""
    if record.name.startswith("kafka") and record.exc_info:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python's INFO is connection chatter
    if logging.getLogger().level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_kafka_without_tracebacks)
    try:
        return args.func(args)
    except AbqError as e:  # anything else is a bug: its traceback is printed and the exit code is 1
        print(f"abq: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
