"""Several local KRaft nodes as one replicated cluster: each node a broker and a controller voter."""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from abqueue.kafka.replication import default_replication
from abqueue.localkafka.broker import (
    ADMIN_USER,
    DATA_DIR_MARKER,
    BrokerError,
    LocalBroker,
    default_cache_dir,
    free_port,
    new_cluster_id,
    wipe,
    write_private,
)

CLUSTER_FILE = "abqueue-cluster.json"
# ABQ_ settings of the super user of a cluster started with --acl: `set -a; . DIR/admin.env; set +a`.
ADMIN_ENV = "admin.env"


def write_env(path: Path, env: dict[str, str]) -> None:
    """A file of NAME=value lines for `set -a; . FILE`, readable by its owner alone."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        out[name] = shlex.split(value)[0] if value else ""
    return out


def stored_size(data_dir: Path) -> int | None:
    """How many nodes the cluster kept in `data_dir` has (1 for a single broker's directory)."""
    try:
        return int(json.loads((data_dir / CLUSTER_FILE).read_text())["brokers"])
    except (OSError, ValueError, KeyError):
        return 1 if (data_dir / DATA_DIR_MARKER).exists() else None


@dataclass
class NodeStatus:
    node_id: int
    port: int
    pid: int | None
    running: bool


@dataclass
class ClusterStatus:
    nodes: list[NodeStatus]
    controller: int | None = None  # the active KRaft controller's node id
    under_replicated: list[str] = field(default_factory=list)  # "topic/partition: 2 of 3 in sync"
    fewer_replicas: list[str] = field(default_factory=list)  # topics with fewer copies than the default


@dataclass
class LocalCluster:
    """`brokers` nodes on ports `port`, `port+1`, ...; one node keeps the single broker's layout, so a
    directory made by LocalBroker is the same as a one-node cluster's."""

    port: int = 9092
    brokers: int = 1
    data_dir: Path = None  # type: ignore[assignment]  # default: under cache_dir, set in __post_init__
    cache_dir: Path = None  # type: ignore[assignment]
    heap: str = "512m"
    sasl_port: int | None = None
    sasl_users: dict[str, str] | None = None
    ssl_port: int | None = None
    acl: bool = False

    def __post_init__(self) -> None:
        if self.brokers < 1:
            raise BrokerError(f"--brokers {self.brokers}: a cluster needs at least one broker")
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        self.data_dir = Path(self.data_dir or self.cache_dir / f"kafka-{self.port}")
        single = self.brokers == 1
        self.nodes = [
            LocalBroker(
                port=self.port + i,
                data_dir=self.data_dir if single else self.data_dir / f"node-{i + 1}",
                cache_dir=self.cache_dir,
                heap=self.heap,
                sasl_port=self.sasl_port + i if self.sasl_port else None,
                sasl_users=self.sasl_users,
                ssl_port=self.ssl_port + i if self.ssl_port else None,
                node_id=i + 1,
                tls_dir=None if single else self.data_dir / "tls",
                acl=self.acl,
            )
            for i in range(self.brokers)
        ]

    @classmethod
    def kept(cls, port: int = 9092, data_dir: Path | None = None, cache_dir: Path | None = None) -> LocalCluster:
        """The cluster whose data is kept in the data dir, whatever its size (for down, status, reset)."""
        cache = Path(cache_dir or default_cache_dir())
        d = Path(data_dir or cache / f"kafka-{port}")
        return cls(port=port, brokers=stored_size(d) or 1, data_dir=d, cache_dir=cache, acl=(d / ADMIN_ENV).exists())

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def tls_files(self):
        return self.nodes[0].tls_files

    def node(self, node_id: int) -> LocalBroker:
        return self.nodes[node_id - 1]

    def running(self) -> bool:
        return all(n.running() for n in self.nodes)

    def start(self, timeout: float = 120.0, log=print, fresh: bool = False) -> str:
        if fresh:
            self.reset()
        if self.running():
            return self.bootstrap
        if len(self.nodes) > 1:
            self._prepare()
        formatted = {}
        try:
            for n in self.nodes:
                if not n.running():
                    formatted[n.node_id] = n.launch(log=log)
            for n in self.nodes:
                if n.node_id in formatted:
                    # SCRAM users live in the cluster's metadata: adding them through one node is enough.
                    n.wait_ready(timeout, add_users=formatted[n.node_id] and n is self.nodes[0])
        except BaseException:
            self.stop()
            raise
        if self.acl:
            write_env(self.admin_env, self.client_env(ADMIN_USER, self.nodes[0].admin_password or "", "PLAIN"))
        return self.bootstrap

    @property
    def admin_env(self) -> Path:
        return self.data_dir / ADMIN_ENV

    def load_admin_password(self) -> None:
        """Give every node the super user's password kept in admin.env (a cluster that was started by
        another process: `down`, `status`, `acl`), so their admin connections authenticate."""
        if self.acl and self.admin_env.exists():
            password = read_env(self.admin_env)["ABQ_SASL_PASSWORD"]
            for n in self.nodes:
                n.admin_password = n.admin_password or password

    def client_env(self, user: str, password: str, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """ABQ_ settings that connect as `user` to this cluster's SASL client ports."""
        return {
            "ABQ_BOOTSTRAP_SERVERS": self.bootstrap,
            "ABQ_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "ABQ_SASL_MECHANISM": mechanism,
            "ABQ_SASL_USERNAME": user,
            "ABQ_SASL_PASSWORD": password,
        }

    def _prepare(self) -> None:
        """Give every node the quorum and cluster id; a new directory gets new ones, kept for restarts."""
        kept = stored_size(self.data_dir)
        if kept is not None and kept != len(self.nodes):
            raise BrokerError(
                f"{self.data_dir} holds a {kept}-node cluster, not {len(self.nodes)}; start it with --brokers {kept}, "
                "or wipe it with `abq kafka reset` (or `up --fresh`)"
            )
        if self.data_dir.exists() and any(self.data_dir.iterdir()) and kept is None:
            raise BrokerError(
                f"data dir {self.data_dir} is not empty and was not made by abqueue; pass an empty or new --data-dir"
            )
        path = self.data_dir / CLUSTER_FILE
        if kept is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
            (self.data_dir / DATA_DIR_MARKER).write_text(
                f"a {len(self.nodes)}-node cluster made by abqueue's local broker; wiped by `abq kafka reset`\n"
            )
            state = {
                "brokers": len(self.nodes),
                "cluster_id": new_cluster_id(),
                "voters": {str(n.node_id): free_port() for n in self.nodes},
                "admin_password": secrets.token_urlsafe(24) if self.acl else None,
            }
            write_private(path, json.dumps(state))
        state = json.loads(path.read_text())
        voters = {int(k): v for k, v in state["voters"].items()}
        for n in self.nodes:
            n.voters, n.cluster_id = voters, state["cluster_id"]
            n.admin_password = n.admin_password or state.get("admin_password")

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop every node; all are asked at once, so none waits alone for a lost quorum."""
        pids = [(n, n.terminate()) for n in self.nodes]
        deadline = time.monotonic() + timeout
        for n, pid in pids:
            if pid is not None:  # one deadline for all: a node that hangs in shutdown is killed once
                n.wait_stopped(pid, max(0.0, deadline - time.monotonic()))
        return any(pid is not None for _, pid in pids)

    def reset(self) -> bool:
        """Stop every node and delete the data (only a directory abqueue made)."""
        if len(self.nodes) == 1:
            return self.nodes[0].reset()
        self.stop()
        return wipe(self.data_dir)

    def status(self) -> ClusterStatus:
        nodes = [NodeStatus(n.node_id, n.port, n.pid(), n.running()) for n in self.nodes]
        out = ClusterStatus(nodes)
        up = [n for n in self.nodes if n.running()]
        if up:
            self.load_admin_password()
            admin = {**up[0].admin_config(), "bootstrap_servers": ",".join(n.bootstrap for n in up)}
            _describe(admin, out, default_replication(len(self.nodes)).factor)
        return out


def _describe(admin_config: dict, out: ClusterStatus, default_replicas: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(**admin_config, request_timeout_ms=5000, bootstrap_timeout_ms=5000)
    except (KafkaError, OSError):
        return
    try:
        try:
            quorum = admin.describe_metadata_quorum()
            out.controller = quorum["topics"][0]["partitions"][0]["leader_id"]
        except (KafkaError, KeyError, IndexError):
            out.controller = None  # no leader: a majority of the voters is down
        for t in admin.describe_topics():
            parts = t["partitions"]
            for p in parts:
                isr, replicas = len(p["isr_nodes"]), len(p["replica_nodes"])
                if isr < replicas:
                    out.under_replicated.append(f"{t['name']}/{p['partition_index']}: {isr} of {replicas} in sync")
            fewest = min((len(p["replica_nodes"]) for p in parts), default=default_replicas)
            if fewest < default_replicas:
                out.fewer_replicas.append(
                    f"{t['name']}: {fewest} replicas (the cluster's default is {default_replicas})"
                )
        out.under_replicated.sort()
        out.fewer_replicas.sort()
    finally:
        admin.close()
