"""`abq demo`: a local broker, one worker per variant of the `demo` experiment, a few hundred
requests from many users, and per-variant counts and latencies."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

from abqueue.cli import options
from abqueue.cli.exits import ExitCode
from abqueue.errors import UsageError

MISSING = ExitCode(1, "some requests got no response within --timeout")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole path locally: broker, two workers (90/10), requests, a summary",
        description="Starts the local Kafka broker (unless ABQ_BOOTSTRAP_SERVERS points elsewhere), "
        "a worker per variant, submits requests and prints per-variant results.",
    )
    options.add_experiment_flags(p)
    p.add_argument("--requests", type=int, default=300, help="requests to send (default 300)")
    p.add_argument("--users", type=int, default=200, help="distinct routing keys (default 200)")
    options.add_engine_flags(p, "every variant")
    p.add_argument("--port", type=int, default=9092, help="local broker port (default 9092)")
    p.add_argument("--keep-kafka", action="store_true", help="leave the broker running afterwards")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all responses")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def _wait_ready(ports: list[int], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(ports)
    while waiting and time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise UsageError(f"a worker exited with code {proc.returncode} during start-up; see its output above")
        for port in list(waiting):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        waiting.discard(port)
            except OSError:
                pass
        time.sleep(0.2)
    if waiting:
        raise UsageError(f"workers not ready within {timeout:.0f}s; see their output above")


def run(args: argparse.Namespace) -> int:
    from abqueue.localkafka import LocalBroker
    from abqueue.localkafka.broker import free_port
    from producers import AbqClient
    from schemas import InferenceRequest

    exp = options.experiment(args)
    options.engine_args(args)  # a malformed --engine-arg fails here, not in every worker
    options.kafka_settings(args)  # and bad Kafka settings before a broker is started for nothing
    broker = None
    # Which broker the demo uses is said whenever it is not the local one on --port: a user who set
    # ABQ_BOOTSTRAP_SERVERS long ago and passed --port was left guessing.
    named_by = "--bootstrap-servers" if args.bootstrap_servers is not None else "ABQ_BOOTSTRAP_SERVERS"
    if args.bootstrap_servers is None and "ABQ_BOOTSTRAP_SERVERS" not in os.environ:
        # Like the tests, the demo runs on a cluster named by KAFKA_BOOTSTRAP_SERVERS when one is.
        args.bootstrap_servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        named_by = "KAFKA_BOOTSTRAP_SERVERS"
        if args.bootstrap_servers is None:
            named_by = ""
            broker = LocalBroker(port=args.port)
            started_here = not broker.running()
            print(f"demo: starting local Kafka on 127.0.0.1:{args.port}...", file=sys.stderr)
            args.bootstrap_servers = broker.start(log=lambda m: print(f"demo: {m}", file=sys.stderr))
            if not started_here:
                broker = None  # someone else's broker: leave it running
    settings = options.kafka_settings(args)
    if named_by:
        unused = f"; --port {args.port} is for the local broker and is not used" if args.port != 9092 else ""
        print(f"demo: using Kafka at {settings.bootstrap_servers} (from {named_by}){unused}", file=sys.stderr)
    # Workers' routine INFO lines would bury the summary; ABQ_LOG_LEVEL still wins where set.
    env = {"ABQ_LOG_LEVEL": "WARNING", **os.environ, "ABQ_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
    procs, ports = [], []
    try:
        client = AbqClient(settings, exp)  # creates the topics and marks where responses start
        for v in exp.variants:
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "abqueue.cli.main",
                "worker",
                "--variant",
                v.name,
                "--metrics-port",
                str(port),
                "--worker-id",
                f"demo-{v.name}",
            ]
            if args.config:
                cmd += ["--config", args.config]
            cmd += options.engine_flags(args)
            procs.append(subprocess.Popen(cmd, env=env))
            ports.append(port)
        print(
            f"demo: started {len(procs)} workers ({', '.join(v.name for v in exp.variants)}); waiting until ready...",
            file=sys.stderr,
        )
        _wait_ready(ports, procs, timeout=600 if (args.engine or exp.variants[0].engine) == "vllm" else 60)

        sent_at: dict[str, float] = {}
        t0 = time.monotonic()
        for i in range(args.requests):
            req = InferenceRequest(
                experiment=exp.name,
                routing_key=f"user-{i % args.users}",
                prompt=f"request {i}: tell user {i % args.users} something about queues",
                max_tokens=16,
            )
            req, _ = client.publish(req)
            sent_at[req.id] = time.monotonic()
        client.publisher.flush()
        latencies: dict[str, list[float]] = {v.name: [] for v in exp.variants}
        errors: dict[str, int] = {v.name: 0 for v in exp.variants}

        def record(reply) -> None:
            r = reply.response
            latencies[r.variant].append(time.monotonic() - sent_at[r.request_id])
            errors[r.variant] += 0 if r.ok else 1

        got = client.wait(set(sent_at), args.timeout, on_reply=record)
        elapsed = time.monotonic() - t0
        client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None and not args.keep_kafka:
            broker.stop()

    print(
        f"\nexperiment {exp.name}: {len(got)}/{len(sent_at)} responses in {elapsed:.2f}s "
        f"({len(got) / elapsed:.0f} req/s) from {min(args.users, args.requests)} users"
    )
    print(
        f"{'variant':<10}{'weight':>8}{'count':>8}{'share':>8}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
    )
    for v in exp.variants:
        lat = latencies[v.name]
        share = 100.0 * len(lat) / max(1, len(got))
        print(
            f"{v.name:<10}{v.weight:>7g}%{len(lat):>8}{share:>7.1f}%{errors[v.name]:>8}"
            f"{_ms(lat, 50)}{_ms(lat, 95)}{_ms(lat, 99)}"
        )
    missing = len(sent_at) - len(got)
    if missing:
        print(f"abq: {missing} requests got no response within {args.timeout:g}s", file=sys.stderr)
        return MISSING
    return 0


def _ms(latencies: list[float], q: float) -> str:
    """A latency column: '-' for a variant that got no requests (not nan)."""
    from abqueue.analysis.stats import percentile

    return f"{percentile(latencies, q) * 1000:>10.1f}" if latencies else f"{'-':>10}"
