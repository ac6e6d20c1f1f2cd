"""`abq gateway`: serve OpenAI's chat and completion endpoints over the experiments' queues."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import re
import signal
import socket
from pathlib import Path

from abqueue.cli import options
from abqueue.errors import UsageError
from schemas import load_experiment

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "gateway",
        help="OpenAI-compatible HTTP endpoints (chat, completions, models) over the experiments' queues",
        description="Point an OpenAI SDK's base_url at http://HOST:PORT/v1: `model` names an experiment "
        "(experiment:variant pins a variant), each request is assigned, queued and answered by the variant's workers.",
    )
    p.add_argument(
        "--config",
        action="append",
        default=None,
        help="experiment config YAML; repeat to serve several (default: the demo)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-keys", type=Path, default=None, metavar="FILE",
        help="YAML mapping each tenant to its API key or keys (e.g. a mounted Kubernetes Secret); without it, one anonymous tenant",
    )  # fmt: skip
    p.add_argument(
        "--allow-anonymous", action="store_true",
        help="serve without --api-keys on an address other than loopback (anyone who reaches it may use it)",
    )  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds a caller waits for its answer before 504 (default 60)")  # fmt: skip
    p.add_argument(
        "--max-backlog", type=int, default=None,
        help="requests waiting per variant over which new ones get 429 with Retry-After (default: never shed)",
    )  # fmt: skip
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB); larger: 413"
    )
    p.add_argument(
        "--storage", type=Path, default=Path.home() / ".local" / "share" / "abqueue" / "gateway",
        help="directory for uploaded files and batch results; replicas must share it (a PersistentVolume) "
        "(default ~/.local/share/abqueue/gateway)",
    )  # fmt: skip
    p.add_argument("--max-file-lines", type=int, default=50_000, help="requests per batch input file (default 50,000)")
    p.add_argument("--max-file-bytes", type=int, default=200_000_000, help="bytes per uploaded file (default 200 MB)")
    p.add_argument(
        "--max-stream-parts", type=int, default=512,
        help="a stream's Kafka records that may wait for a slow reader; one further behind is ended with a "
        "slow_reader error event, so that it never holds up other callers (default 512)",
    )  # fmt: skip
    p.add_argument("--instance", default=None, help="names this gateway's reply topics (default: the host name)")
    options.add_kafka_flags(p)
    p.set_defaults(func=run)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the gateway needs FastAPI and uvicorn: pip install 'abqueue[gateway]'") from None
    from abqueue.gateway.app import Gateway, Limits, create_app
    from abqueue.gateway.tenants import Tenants

    if args.api_keys is None and not _loopback(args.host) and not args.allow_anonymous:
        raise UsageError(
            f"refusing to serve {args.host} without --api-keys: anyone who reaches it could use it; "
            "pass --api-keys FILE, or --allow-anonymous if that is what you want"
        )
    if (
        args.request_timeout <= 0
        or args.max_body_bytes <= 0
        or args.max_stream_parts <= 0
        or (args.max_backlog is not None and args.max_backlog < 0)
    ):
        raise UsageError(
            "--request-timeout, --max-body-bytes and --max-stream-parts must be positive and --max-backlog at least 0"
        )
    tenants = Tenants.from_file(args.api_keys) if args.api_keys else Tenants()
    experiments = [load_experiment(c) for c in args.config or [None]]
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise UsageError(f"two --config files define the same experiment: {names}")
    instance = re.sub(r"[^A-Za-z0-9_-]", "-", args.instance or socket.gethostname())[:60]
    if instance == "batches":
        raise UsageError("--instance batches would share the batches' reply topic; name the instance otherwise")
    limits = Limits(
        args.request_timeout, args.max_body_bytes, args.max_backlog,
        max_file_lines=args.max_file_lines, max_file_bytes=args.max_file_bytes, max_stream_parts=args.max_stream_parts,
    )  # fmt: skip
    # The port first: taken, it is one line and nothing is created (it printed a serving banner and
    # exited 3, after creating its reply topic).
    listening = _listen(args.host, args.port)
    try:
        gateway = Gateway(options.kafka_settings(args), experiments, tenants, instance, limits, storage=args.storage)
    except BaseException:
        listening.close()
        raise
    try:
        log.info(
            "gateway for %s on http://%s:%d/v1 (%s)", ", ".join(names), args.host, args.port,
            "anonymous" if tenants.anonymous else "API keys",
        )  # fmt: skip
        # No access log: its lines would carry every caller's address and path at INFO, and ours say enough.
        config = uvicorn.Config(create_app(gateway), host=args.host, port=args.port, access_log=False, log_level="warning")  # fmt: skip
        # uvicorn stops serving on SIGTERM, then raises the signal again to whatever handler it found:
        # with the default one the process died there (exit 143), its Kafka clients never closed. A
        # SIGTERM (Kubernetes' way to stop a pod) is a clean stop here, as it is for the worker.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            uvicorn.Server(config).run(sockets=[listening])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        gateway.close()
        listening.close()
    log.info("gateway stopped")
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for the server, or a one-line UsageError where that cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is in use; stop what listens there or pass another --port"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock
