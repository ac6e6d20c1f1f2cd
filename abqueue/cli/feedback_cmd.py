"""`abq feedback`: record what a user thought of a response, for `abq report` to compare variants."""

from __future__ import annotations

import argparse

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "feedback",
        help="record a user's thumbs up/down or score for a response",
        description="Publishes a Feedback record to abq.<experiment>.feedback, keyed by request id; abq report "
        "joins it to the response (the latest feedback per request counts).",
    )
    options.add_experiment_flags(p)
    p.add_argument("--request-id", required=True, help="the id of the request the response answered")
    p.add_argument(
        "--caller-tag",
        default=None,
        help="the caller_tag of the response (abq submit prints it): the answer is the one with this tag and id",
    )
    p.add_argument("--thumbs", choices=["up", "down"], default=None)
    p.add_argument("--score", type=float, default=None, help="any scale; compared as a mean per variant")
    p.add_argument("--comment", default=None)
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from producers.feedback import publish_feedback
    from schemas import Feedback

    if args.thumbs is None and args.score is None:
        raise UsageError("give --thumbs up|down or --score X (or both)")
    if args.config is None and args.experiment != "demo":
        # Without it, feedback meant for another experiment was recorded on the built-in demo, silently.
        raise UsageError(
            "give --config FILE: the experiment whose answer the feedback is on (--experiment demo for the demo)"
        )
    exp = options.experiment(args)
    fb = options.typed(
        Feedback, "feedback", request_id=args.request_id, experiment=exp.name, caller_tag=args.caller_tag, thumbs=args.thumbs,
        score=args.score, comment=args.comment,
    )  # fmt: skip
    publish_feedback(options.kafka_settings(args), exp, fb)
    print(f"feedback for {fb.request_id} recorded on {exp.feedback_topic}")
    return 0
