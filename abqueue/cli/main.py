"""Entry point of `abq`. Every user-facing error ends as one line naming the problem and the fix."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kafka.errors import AuthorizationError as KafkaAuthorizationError

from abqueue.cli import (
    batch_cmd,
    demo_cmd,
    deploy_cmd,
    evaluate_cmd,
    experiment_cmd,
    feedback_cmd,
    gateway_cmd,
    k8s_cmd,
    kafka_cmd,
    keda_cmd,
    report_cmd,
    rollout_cmd,
    schemas_cmd,
    submit_cmd,
    worker_cmd,
)
from abqueue.cli.exits import INTERRUPTED, PIPE_CLOSED, USER_ERROR
from abqueue.errors import AbqError

# In the order `abq --help` lists them.
COMMANDS = (
    demo_cmd, worker_cmd, submit_cmd, batch_cmd, gateway_cmd, feedback_cmd, experiment_cmd, rollout_cmd,
    report_cmd, evaluate_cmd, kafka_cmd, k8s_cmd, keda_cmd, deploy_cmd, schemas_cmd,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="abq", description="Queue-based LLM inference for A/B-tested model rollouts, on Kafka and vLLM."
    )
    p.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("ABQ_LOG_LEVEL", "INFO"),
        help=f"{', '.join(LOG_LEVELS)} (env ABQ_LOG_LEVEL)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _kafka_without_tracebacks(record: logging.LogRecord) -> bool:
    """kafka-python logs a refused or dropped connection with its traceback: a stack of its own
    socket code above the one line that names the problem. Below DEBUG, keep the line."""
    if record.name.startswith("kafka") and record.exc_info:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def _kafka_without_alarms(record: logging.LogRecord) -> bool:
    """kafka-python 3 warns that a task 'is blocking the event loop' whenever the process is busy
    (a worker's loop, vLLM on the same cores): its own latency check, nothing the user can act on. And
    every clean close cancels a metadata refresh in flight, which it logs as an ERROR. Both are kept
    at DEBUG; every other warning and error of kafka-python shows."""
    if not record.name.startswith("kafka"):
        return True
    message = record.getMessage()
    if "blocking the event loop" in message:
        return False
    return not (
        message.startswith("Metadata refresh: failed")
        and record.args
        and type(record.args[0] if isinstance(record.args, tuple) else record.args).__name__ == "Cancelled"
    )


class FoldRepeats(logging.Filter):
    """A message logged again and again (kafka-python retrying a handshake, a worker whose broker is
    gone) is shown once per `window_s`, then with how many were folded, so that the line that names
    the problem is not buried. Repeats are the same logger, level and message template."""

    def __init__(self, window_s: float = 30.0):
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple, tuple[float, int]] = {}  # key -> (when last shown, folded since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        key = (record.name, record.levelno, record.msg if isinstance(record.msg, str) else repr(record.msg))
        now = record.created
        shown, folded = self._seen.get(key, (float("-inf"), 0))
        if now - shown < self.window_s:
            self._seen[key] = (shown, folded + 1)
            return False
        if folded:
            record.msg = f"{record.getMessage()} ({folded} more like this in the last {now - shown:.0f}s)"
            record.args = None
        self._seen[key] = (now, 0)
        if len(self._seen) > 10_000:  # bounded: drop the oldest keys
            for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:5_000]:
                del self._seen[old]
        return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def refusal(e: KafkaAuthorizationError, args: argparse.Namespace) -> str:
    user = getattr(args, "sasl_username", None) or os.environ.get("ABQ_SASL_USERNAME") or "(no SASL user)"
    what = {
        "TopicAuthorizationFailedError": "access to a topic",
        "GroupAuthorizationFailedError": "access to a consumer group",
        "ClusterAuthorizationFailedError": "a cluster-wide operation",
        "TransactionalIdAuthorizationFailedError": "a transactional id",
    }.get(type(e).__name__, "the operation")
    # kafka-python's text is "[Error 30] GroupAuthorizationFailedError: NAME"; the name is what matters.
    detail = _one_line(e).removeprefix(f"[Error {e.errno}] ").removeprefix(type(e).__name__).lstrip(": ")
    return (
        f"Kafka refused {what} to user {user} ({type(e).__name__}{': ' + detail if detail else ''}); "
        "its role's ACLs do not allow it: run this as a user whose role does (docs/guides/kafka-security.md)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own errors (usage and one line) and --help
        return int(e.code or 0)
    # argparse applies --log-level's type to a string default too: ABQ_LOG_LEVEL is checked the same way.
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kafka-python's INFO is connection chatter; and it must not speak below the level asked for.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    if logging.getLogger().level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_kafka_without_tracebacks)
            handler.addFilter(_kafka_without_alarms)
            handler.addFilter(FoldRepeats())
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away shows here
        return code
    except AbqError as e:  # anything else is a bug: its traceback is printed and the exit code is 1
        print(f"abq: error: {_one_line(e)}", file=sys.stderr)
        return USER_ERROR
    except KafkaAuthorizationError as e:
        # The broker's ACLs said no: not a bug, and the fix is the user's role, not this command.
        print(f"abq: error: {refusal(e, args)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"abq: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # `abq ... | head`: the reader has what it wanted. Quietly, as a shell reports SIGPIPE; stdout
        # goes to /dev/null so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
