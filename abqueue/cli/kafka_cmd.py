"""`abq kafka up|down|status|reset`: the local single-node KRaft broker."""

from __future__ import annotations

import argparse
import os
import sys

from abqueue.errors import UsageError
from abqueue.localkafka import LocalBroker
from abqueue.localkafka.broker import port_open


def register(sub) -> None:
    p = sub.add_parser(
        "kafka",
        help="run a local single-node Apache Kafka broker (KRaft) on 127.0.0.1",
        description="Fetches the broker jars from Maven Central once (cached), then runs Kafka locally.",
    )
    ksub = p.add_subparsers(dest="kafka_cmd", required=True, metavar="{up,down,status,reset}")
    for name, help_ in (
        ("up", "start the broker on the data it has, and wait until it answers"),
        ("down", "stop the broker; its data stays for the next `up`"),
        ("status", "say whether the broker runs (exit 0 if it does, 3 if not)"),
        ("reset", "stop the broker and delete its data: topics, queued requests, offsets, configs"),
    ):
        sp = ksub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1 (default 9092)")
        sp.add_argument("--data-dir", default=None, help="broker state dir (default: under the cache dir, per port)")
        sp.add_argument(
            "--cache-dir", default=None, help="where jars are cached (env ABQ_CACHE_DIR; default ~/.cache/abqueue)"
        )
        if name == "up":
            sp.add_argument(
                "--sasl-port",
                type=int,
                default=None,
                help="also open a SASL_PLAINTEXT listener here (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)",
            )
            sp.add_argument(
                "--sasl-user",
                action="append",
                default=None,
                metavar="NAME:PASSWORD",
                help="a user of the SASL listener, repeatable; the command line shows in `ps`, so prefer "
                "ABQ_KAFKA_SASL_USERS=NAME:PASSWORD[,NAME:PASSWORD...]",
            )
            sp.add_argument(
                "--ssl-port",
                type=int,
                default=None,
                help="also open an SSL listener here that requires client certificates (made with openssl)",
            )
            sp.add_argument("--fresh", action="store_true", help="delete the broker's data first (as `reset`)")
        sp.set_defaults(func=run)


def sasl_users(args: argparse.Namespace) -> list[str]:
    given = getattr(args, "sasl_user", None)
    if given is not None:
        return given
    return [u for u in os.environ.get("ABQ_KAFKA_SASL_USERS", "").split(",") if u] if hasattr(args, "sasl_user") else []


def run(args: argparse.Namespace) -> int:
    users = {}
    for item in sasl_users(args):
        name, sep, password = item.partition(":")
        if not sep or not name or not password:
            raise UsageError(f"--sasl-user {name or item!r} is not NAME:PASSWORD")
        users[name] = password
    if users and not getattr(args, "sasl_port", None):
        raise UsageError("--sasl-user needs --sasl-port, the port of the SASL listener")
    broker = LocalBroker(
        port=args.port,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        sasl_port=getattr(args, "sasl_port", None),
        sasl_users=users,
        ssl_port=getattr(args, "ssl_port", None),
    )
    if args.kafka_cmd == "up":
        was = broker.running()
        bootstrap = broker.start(log=lambda m: print(m, file=sys.stderr), fresh=args.fresh)
        print(bootstrap)
        where = f" --data-dir {args.data_dir}" if args.data_dir else ""
        print(
            f"{'already running' if was else 'started'}; log {broker.log_file}; "
            f"stop with `abq kafka down --port {args.port}{where}`",
            file=sys.stderr,
        )
        if broker.sasl_port:
            print(
                f"SASL_PLAINTEXT listener on 127.0.0.1:{broker.sasl_port} (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)",
                file=sys.stderr,
            )
        if broker.tls_files:
            t = broker.tls_files
            print(
                f"SSL listener on 127.0.0.1:{broker.ssl_port}; connect with ABQ_SECURITY_PROTOCOL=SSL "
                f"ABQ_SSL_CAFILE={t.ca} ABQ_SSL_CERTFILE={t.client_cert} ABQ_SSL_KEYFILE={t.client_key}",
                file=sys.stderr,
            )
        return 0
    if args.kafka_cmd == "reset":
        wiped = broker.reset()
        print(f"deleted {broker.data_dir}" if wiped else f"no data in {broker.data_dir}")
        return 0
    if args.kafka_cmd == "down":
        stopped = broker.stop()
        if not stopped and port_open("127.0.0.1", args.port):
            # A broker started with another --data-dir: its pid is kept there, not here.
            raise UsageError(
                f"no broker of data dir {broker.data_dir} runs, but something listens on port {args.port}; if "
                "`abq kafka up --data-dir DIR` started it, stop it with `abq kafka down --port "
                f"{args.port} --data-dir DIR`"
            )
        print(f"stopped broker on {broker.bootstrap}" if stopped else f"no broker was running on {broker.bootstrap}")
        return 0
    if broker.running():
        print(f"running on {broker.bootstrap} (pid {broker.pid()}, data {broker.data_dir})")
        return 0
    print(f"not running on {broker.bootstrap}")
    return 3
