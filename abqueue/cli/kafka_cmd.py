"""`abq kafka up|down|status|reset`: the local KRaft broker, or a replicated cluster of them."""

from __future__ import annotations

import argparse
import os
import sys

from abqueue.cli.exits import ExitCode
from abqueue.errors import UsageError
from abqueue.localkafka import LocalCluster
from abqueue.localkafka.broker import port_open

NOT_RUNNING = ExitCode(3, "`status`: the broker, or a node of the cluster, is not running")


def register(sub) -> None:
    p = sub.add_parser(
        "kafka",
        help="run a local Apache Kafka broker (KRaft) on 127.0.0.1, or a replicated cluster of them",
        description="Fetches the broker jars from Maven Central once (cached), then runs Kafka locally.",
    )
    ksub = p.add_subparsers(dest="kafka_cmd", required=True, metavar="{up,down,status,reset,acl}")
    for name, help_ in (
        ("up", "start the broker (or cluster) on the data it has, and wait until it answers"),
        ("down", "stop the broker (every node of a cluster); its data stays for the next `up`"),
        ("status", "each node, the controller and under-replicated partitions (exit 0 if all run, 3 if not)"),
        ("reset", "stop the broker and delete its data: topics, queued requests, offsets, configs"),
        ("acl", "make an experiment's users (producer per client, worker per variant, operator, KEDA) and their ACLs"),
    ):
        sp = ksub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--port",
            type=int,
            default=int(os.environ.get("ABQ_KAFKA_PORT") or 9092),
            help="client port on 127.0.0.1 (env ABQ_KAFKA_PORT; default 9092); a cluster's nodes count up from it",
        )
        sp.add_argument("--data-dir", default=None, help="broker state dir (default: under the cache dir, per port)")
        sp.add_argument(
            "--cache-dir", default=None, help="where jars are cached (env ABQ_CACHE_DIR; default ~/.cache/abqueue)"
        )
        if name == "up":
            sp.add_argument(
                "--brokers",
                type=int,
                default=None,
                help="nodes, each a broker and a controller voter (default: as kept in the data dir, else 1); "
                "3 gives replicated topics that survive the loss of a node",
            )
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
            sp.add_argument(
                "--acl",
                action="store_true",
                help="access control: the client port takes SASL only, KRaft's StandardAuthorizer allows what ACLs "
                "grant; the super user's settings are written to DATA_DIR/admin.env; then `abq kafka acl`",
            )
            sp.add_argument("--fresh", action="store_true", help="delete the broker's data first (as `reset`)")
        if name == "acl":
            sp.add_argument("--config", required=True, metavar="FILE", help="experiment config YAML")
            sp.add_argument(
                "--client",
                action="append",
                default=None,
                metavar="NAME",
                help="a producer user per client, repeatable (default: app); it reads only abq.EXPERIMENT.replies.NAME.*",
            )
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
    acl = getattr(args, "acl", False)
    if users and not getattr(args, "sasl_port", None) and not acl:
        raise UsageError("--sasl-user needs --sasl-port, the port of the SASL listener (or --acl)")
    if acl and getattr(args, "sasl_port", None):
        raise UsageError("--acl makes the client port (--port) take SASL; drop --sasl-port")
    kept = LocalCluster.kept(args.port, args.data_dir, args.cache_dir)
    cluster = LocalCluster(
        port=args.port,
        brokers=getattr(args, "brokers", None) or kept.brokers,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        sasl_port=getattr(args, "sasl_port", None),
        sasl_users=users,
        ssl_port=getattr(args, "ssl_port", None),
        acl=acl or kept.acl,
    )
    where = f" --port {args.port}" + (f" --data-dir {args.data_dir}" if args.data_dir else "")
    if args.kafka_cmd == "up":
        return _up(args, cluster, where)
    if args.kafka_cmd == "acl":
        return _acl(args, cluster)
    if args.kafka_cmd == "reset":
        wiped = cluster.reset()
        print(f"deleted {cluster.data_dir}" if wiped else f"no data in {cluster.data_dir}")
        return 0
    if args.kafka_cmd == "down":
        stopped = cluster.stop()
        if not stopped and port_open("127.0.0.1", args.port):
            # A broker started with another --data-dir: its pid is kept there, not here.
            raise UsageError(
                f"no broker of data dir {cluster.data_dir} runs, but something listens on port {args.port}; if "
                "`abq kafka up --data-dir DIR` started it, stop it with `abq kafka down --port "
                f"{args.port} --data-dir DIR`"
            )
        print(f"stopped broker on {cluster.bootstrap}" if stopped else f"no broker was running on {cluster.bootstrap}")
        return 0
    return _status(cluster)


def _up(args: argparse.Namespace, cluster: LocalCluster, where: str) -> int:
    was = cluster.running()
    bootstrap = cluster.start(log=lambda m: print(m, file=sys.stderr), fresh=args.fresh)
    print(bootstrap)
    nodes = f"{len(cluster.nodes)} nodes" if len(cluster.nodes) > 1 else "broker"
    print(
        f"{nodes} {'already running' if was else 'started'}; log {cluster.nodes[0].log_file}; "
        f"stop with `abq kafka down{where}`",
        file=sys.stderr,
    )
    if len(cluster.nodes) > 1:
        print(
            "topics abqueue creates get 3 replicas and min.insync.replicas 2 (see `abq kafka status`)", file=sys.stderr
        )
    if cluster.acl:
        print(
            f"access control on: SASL only; super user's settings in {cluster.admin_env} "
            f"(`set -a; . {cluster.admin_env}; set +a`); add an experiment's users with `abq kafka acl --config FILE{where}`",
            file=sys.stderr,
        )
    if cluster.sasl_port:
        ports = ",".join(str(n.sasl_port) for n in cluster.nodes)
        print(f"SASL_PLAINTEXT listener on 127.0.0.1:{ports} (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)", file=sys.stderr)
    if cluster.tls_files:
        t = cluster.tls_files
        ports = ",".join(str(n.ssl_port) for n in cluster.nodes)
        print(
            f"SSL listener on 127.0.0.1:{ports}; connect with ABQ_SECURITY_PROTOCOL=SSL "
            f"ABQ_SSL_CAFILE={t.ca} ABQ_SSL_CERTFILE={t.client_cert} ABQ_SSL_KEYFILE={t.client_key}",
            file=sys.stderr,
        )
    return 0


def _status(cluster: LocalCluster) -> int:
    if len(cluster.nodes) == 1:
        node = cluster.nodes[0]
        if node.running():
            print(f"running on {node.bootstrap} (pid {node.pid()}, data {node.data_dir})")
            return 0
        print(f"not running on {node.bootstrap}")
        return NOT_RUNNING
    st = cluster.status()
    for n in st.nodes:
        state = f"running (pid {n.pid})" if n.running else "not running"
        print(f"node {n.node_id}  127.0.0.1:{n.port}  {state}{'  controller' if n.node_id == st.controller else ''}")
    if any(n.running for n in st.nodes):
        print(f"controller: {st.controller if st.controller is not None else 'none elected (is a majority up?)'}")
        print(f"under-replicated partitions: {len(st.under_replicated)}")
        for line in st.under_replicated[:20]:
            print(f"  {line}")
        if len(st.under_replicated) > 20:
            print(f"  ... and {len(st.under_replicated) - 20} more")
        if st.fewer_replicas:
            print(
                f"topics with fewer replicas than the default, which lose records with a broker: {len(st.fewer_replicas)}"
            )
            for line in st.fewer_replicas:
                print(f"  {line}")
    print(f"data {cluster.data_dir}")
    return 0 if all(n.running for n in st.nodes) else NOT_RUNNING


def _acl(args: argparse.Namespace, cluster: LocalCluster) -> int:
    """Users with random passwords (kept in DATA_DIR/users/USER.env, 0600; a rerun keeps them) and
    the ACLs of their roles, from abqueue.kafka.acls: the same ones `abq deploy render --kafka-users` writes."""
    import secrets

    from pydantic import SecretStr

    from abqueue.kafka import KafkaSettings, acls, admin_client
    from abqueue.localkafka.cluster import read_env, write_env
    from schemas import load_experiment

    if not cluster.admin_env.exists():
        raise UsageError(
            f"the broker of {cluster.data_dir} was not started with --acl; `abq kafka up --acl --fresh` wipes it and "
            "starts it with access control"
        )
    if not cluster.running():
        raise UsageError(f"no broker of {cluster.data_dir} runs; start it with `abq kafka up`")
    exp = load_experiment(args.config)
    admin_env = read_env(cluster.admin_env)
    cluster.load_admin_password()
    principals = acls.principals(exp, args.client or ["app"])
    passwords, files = {}, {}
    for p in principals:
        files[p.user] = cluster.data_dir / "users" / f"{p.user}.env"
        kept = read_env(files[p.user]).get("ABQ_SASL_PASSWORD") if files[p.user].exists() else None
        passwords[p.user] = kept or secrets.token_urlsafe(24)
    cluster.nodes[0].add_scram_users(passwords)
    settings = KafkaSettings(
        bootstrap_servers=admin_env["ABQ_BOOTSTRAP_SERVERS"],
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=admin_env["ABQ_SASL_USERNAME"],
        sasl_password=SecretStr(admin_env["ABQ_SASL_PASSWORD"]),
    )
    admin = admin_client(settings)
    try:
        for p in principals:
            acls.apply(admin, p)
    finally:
        admin.close()
    for p in principals:
        write_env(files[p.user], cluster.client_env(p.user, passwords[p.user]))
        print(f"{p.role:<9} {p.user:<40} {len(p.grants)} grants  {files[p.user]}")
    print(f"use one: `set -a; . {cluster.data_dir}/users/USER.env; set +a`", file=sys.stderr)
    return 0
