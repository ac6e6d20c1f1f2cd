"""`abq worker`: serve one variant of an experiment."""

from __future__ import annotations

import argparse
import logging

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="consume a variant's requests, run them through an engine, publish responses",
        description="Consumes the variant's request topics (one per priority) in its consumer group, feeds the "
        "engine as capacity frees up, and commits only offsets whose responses Kafka has acknowledged.",
    )
    options.add_experiment_flags(p, need_variant=True, pools=True)
    options.add_engine_flags(p, "this variant")
    p.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="requests with the engine at most, and buffered per priority level; within it a continuous engine gets "
        "what it can run plus a short queue, read from the engine (default 512; 2 x --max-batch with static batching)",
    )
    p.add_argument(
        "--delivery",
        choices=["at-least-once", "exactly-once"],
        default="at-least-once",
        help="exactly-once commits responses and offsets in one Kafka transaction (readers use read_committed)",
    )
    p.add_argument(
        "--low-priority-share",
        type=float,
        default=0.1,
        help="share of engine slots lower priorities get while higher ones wait (default 0.1)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="requests per engine call with static batching (default 32)",
    )
    p.add_argument(
        "--poll-records",
        type=int,
        default=None,
        help="records one poll may bring (default 128, at least --max-batch); buffers stay bounded by --max-inflight",
    )
    p.add_argument(
        "--max-wait-ms",
        type=int,
        default=50,
        help="static batching: wait this long after the first record for more (default 50)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="take the variant's limits from the live config topic as it changes (abq experiment apply)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /healthz, /readyz on this port")
    p.add_argument("--worker-id", default=None, help="id in responses and logs (default host-pid)")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=120.0,
        help="on SIGTERM, how long to let the engine finish what it has before leaving (default 120; "
        "`abq deploy render` sets the variant's scaling.drain_seconds, inside the pod's grace period)",
    )
    p.add_argument("--engine-attempts", type=int, default=3, help="tries for transient engine errors (default 3)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds the engine may take over one request, retries included, before it is aborted and answered "
        "with engine_error; 0 turns it off (default 600)",
    )
    p.add_argument(
        "--max-poll-interval-ms", type=int, default=300_000, help="longest batch before the group evicts the worker"
    )
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workers.engines.factory import make_engine
    from workers.health import serve
    from workers.middleware import default_middleware
    from workers.worker import Worker

    counts = [args.max_batch, *(n for n in (args.max_inflight, args.poll_records) if n is not None)]
    if min(counts) < 1 or args.max_wait_ms < 0:
        raise UsageError("--max-batch, --max-inflight and --poll-records must be >= 1 and --max-wait-ms >= 0")
    if args.drain_seconds <= 0:
        raise UsageError("--drain-seconds must be > 0; the pod's grace period should exceed it")
    if not 0 < args.low_priority_share <= 0.5:
        raise UsageError("--low-priority-share must be in (0, 0.5]; e.g. 0.1 gives lower levels one slot in ten")
    if args.request_timeout < 0:
        raise UsageError("--request-timeout must be >= 0 seconds (0 turns it off)")
    settings = options.kafka_settings(args)
    exp = options.experiment(args)
    args.variant = options.variant_name(exp, args.variant, pools=True)
    served = exp.serving(args.variant)
    variant = served[0]
    logging.getLogger(__name__).info("connecting: %s", settings.describe())
    # Probes answer from the start: alive while the engine loads, ready once it has answered a request.
    server = None
    if args.metrics_port is not None:
        try:
            server = serve(None, args.metrics_port)
        except OSError as e:
            raise UsageError(
                f"--metrics-port {args.metrics_port} is in use by another process ({e.strerror}); pick a free port"
            ) from None
    engine = make_engine(variant, args.engine, args.model, options.engine_args(args), pool=served)
    follower = None
    if args.follow:
        from abqueue.control.live_config import ConfigFollower

        follower = ConfigFollower(settings)
        follower.caught_up.wait(timeout=10)
    worker = Worker.from_settings(
        settings,
        exp,
        args.variant,
        engine,
        delivery=args.delivery,
        max_batch=args.max_batch,
        poll_records=args.poll_records,
        worker_id=args.worker_id,
        max_poll_interval_ms=args.max_poll_interval_ms,
        max_wait_ms=args.max_wait_ms,
        max_inflight=args.max_inflight,
        low_priority_share=args.low_priority_share,
        middleware=default_middleware(engine_attempts=args.engine_attempts, request_timeout_s=args.request_timeout),
        follow=follower,
        drain_timeout_s=args.drain_seconds,
    )
    if server:
        server.worker = worker
    try:
        worker.run()
    finally:
        if follower:
            follower.close()
        if server:
            server.shutdown()
    return 0
