"""`abq submit`: publish one request, wait for its response, print it."""

from __future__ import annotations

import argparse
import sys

import orjson

from abqueue.cli import options
from abqueue.cli.exits import ExitCode
from abqueue.errors import UsageError
from schemas.body import CHAT, COMPLETIONS, ENDPOINTS, GENERATE
from schemas.request import PRIORITIES

ERROR_ANSWER = ExitCode(
    1, "the answer is an error response (expired, engine_error, invalid_request, ...): it is printed"
)


def register(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="send one request and print its response",
        description="Assigns a variant by routing key, publishes, and waits for the response.",
    )
    options.add_experiment_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--messages", help='chat messages as JSON, e.g. \'[{"role":"user","content":"hi"}]\'')
    src.add_argument(
        "--body",
        help="an OpenAI request body as JSON, for --endpoint, with any field the variant's engine serves "
        '(e.g. \'{"input": "a cat"}\' with --endpoint /v1/embeddings); the sampling flags below do not apply',
    )
    p.add_argument(
        "--endpoint", choices=ENDPOINTS, default=CHAT, help="with --body: the endpoint it is for (default: chat)"
    )
    p.add_argument(
        "--routing-key", required=True, help="user or session key; the same key always gets the same variant"
    )
    p.add_argument("--id", default=None, help="request id (default: generated)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", type=int, default=1, help="samples to return")
    p.add_argument(
        "--deadline-s", type=float, default=None, help="give up (expired) if not started within this many seconds"
    )
    p.add_argument(
        "--reply-to",
        default=None,
        help="also publish the response to this topic (one of the experiment's reply_topics)",
    )
    p.add_argument("--priority", choices=PRIORITIES, default="normal", help="high, normal or batch (default normal)")
    p.add_argument(
        "--metadata",
        default=None,
        help='free JSON object kept with the request; segment overrides match on it, e.g. {"tier": "beta"}',
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="print the answer's text as the worker makes it (chat and completions; the chunks come on a reply "
        "topic: --reply-to, or abq.EXPERIMENT.replies.cli.USER)",
    )
    p.add_argument("--traceparent", default=None, help="W3C traceparent to continue (default: a new trace)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the response (default 60)")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from producers import AbqClient
    from schemas import InferenceRequest

    exp = options.experiment(args)
    fields: dict = dict(
        experiment=exp.name, routing_key=args.routing_key, reply_to=args.reply_to, priority=args.priority
    )
    if args.body is None:
        fields.update(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, stop=args.stop, seed=args.seed,
            n=args.n,
        )  # fmt: skip
    if args.metadata is not None:
        try:
            fields["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as e:
            raise UsageError(f'--metadata is not JSON ({e}); pass an object like \'{{"tier": "beta"}}\'') from None
    if args.id:
        fields["id"] = args.id
    if args.deadline_s is not None:
        fields["deadline"] = time.time() + args.deadline_s
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    elif args.body is not None:
        try:
            fields.update(endpoint=args.endpoint, body=orjson.loads(args.body))
        except orjson.JSONDecodeError as e:
            raise UsageError(f'--body is not JSON ({e}); pass an object like \'{{"input": "a cat"}}\'') from None
    else:
        try:
            fields["messages"] = orjson.loads(args.messages)
        except orjson.JSONDecodeError as e:
            raise UsageError(
                f'--messages is not JSON ({e}); pass a list like \'[{{"role":"user","content":"hi"}}]\''
            ) from None
    if args.stream:
        return _stream(args, exp, fields)
    request = options.typed(InferenceRequest, "request", **fields)
    with AbqClient(options.kafka_settings(args), exp, reply_topic=args.reply_to) as client:
        reply = client.submit(request, timeout=args.timeout, traceparent=args.traceparent)
    sys.stdout.write(
        orjson.dumps(reply.response.model_dump(mode="json", exclude_none=True), option=orjson.OPT_INDENT_2).decode()
        + "\n"
    )
    if reply.traceparent:
        print(f"traceparent: {reply.traceparent}", file=sys.stderr)
    return 0 if reply.response.ok else ERROR_ANSWER


def _stream(args: argparse.Namespace, exp, fields: dict) -> int:
    """Publishes the request as an OpenAI body with stream: true and prints its first choice's text
    as the chunks come."""
    import getpass

    from abqueue.kafka.acls import reply_prefix
    from producers import AbqClient
    from producers.client import StreamError
    from schemas import InferenceRequest
    from schemas.chunks import text_of

    if "body" not in fields:  # the flags as the body they mean
        sampling = {"max_tokens": fields.pop("max_tokens"), "temperature": fields.pop("temperature"),
                    "top_p": fields.pop("top_p"), "stop": fields.pop("stop") or None, "seed": fields.pop("seed"),
                    "n": fields.pop("n")}  # fmt: skip
        if "prompt" in fields:
            fields.update(endpoint=COMPLETIONS, body={"prompt": fields.pop("prompt"), **sampling})
        else:
            fields.update(endpoint=CHAT, body={"messages": fields.pop("messages"), **sampling})
        fields["body"] = {k: v for k, v in fields["body"].items() if v is not None}
    if fields["endpoint"] not in GENERATE:
        raise UsageError(f"--stream is for chat and completions; {fields['endpoint']} answers whole: leave it out")
    fields["body"] = {**fields["body"], "stream": True}
    request = options.typed(InferenceRequest, "request", **fields)
    reply_to = args.reply_to or f"{reply_prefix(exp, 'cli')}{getpass.getuser()}"
    with AbqClient(options.kafka_settings(args), exp, reply_topic=reply_to) as client:
        try:
            for chunk in client.stream(request, timeout=args.timeout):
                sys.stdout.write(text_of(request.endpoint or CHAT, [chunk]))
                sys.stdout.flush()
        except StreamError as e:
            sys.stdout.write("\n")
            print(f"abq: the answer is an error ({e.code}): {e}", file=sys.stderr)
            return ERROR_ANSWER
    sys.stdout.write("\n")
    return 0
