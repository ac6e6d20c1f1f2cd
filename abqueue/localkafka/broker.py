"""Fetch the Kafka broker jars with Maven, format KRaft storage, start, stop and probe the broker."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from abqueue.errors import AbqError

DATA_DIR_MARKER = ".abqueue-local-kafka"
# What a restart must reuse to open the same KRaft storage: the cluster id it was formatted with and
# the controller's port (part of the quorum configuration), plus a fingerprint of the SCRAM users.
STATE_FILE = "abqueue-broker.json"


ADMIN_USER = "admin"
_SCRAM_JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


class BrokerError(AbqError):
    """A local broker problem, one line naming the problem and the fix."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ABQ_CACHE_DIR") or Path.home() / ".cache" / "abqueue")


def _pom_text() -> str:
    return resources.files("abqueue.localkafka").joinpath("pom.xml").read_text()


def jars_dir(cache_dir: Path) -> Path:
    digest = hashlib.sha256(_pom_text().encode()).hexdigest()[:12]
    return cache_dir / f"kafka-jars-{digest}"


def fetch_jars(cache_dir: Path, log=print) -> Path:
    """Download the broker's jars once (Maven); later calls return the cached directory, offline."""
    target = jars_dir(cache_dir)
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is not on PATH; install it (apt-get install maven) to fetch the Kafka jars once")
    if shutil.which("java") is None:
        raise BrokerError("Java is not on PATH; install a JDK 17+ (apt-get install openjdk-17-jre-headless)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Brokers started at once on a fresh machine (parallel test workers, a demo beside the tests) fetch
    # one at a time: the second finds the first's jars, instead of deleting its half-written download.
    with open(cache_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        _download(target, log)
    return target


def _download(target: Path, log) -> None:
    log(f"fetching Kafka broker jars from Maven Central into {target} (once)...")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pom = tmp / "pom.xml"
    pom.write_text(_pom_text())
    cmd = ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp / 'libs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise BrokerError(
            f"fetching Kafka jars failed ({' | '.join(tail)}); check Maven Central is reachable and rerun"
        )
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def new_cluster_id() -> str:
    # Kafka's own Uuid.randomUuid() never starts with "-", which its command line would read as a flag.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(consecutive: int = 1) -> int:
    """The first of `consecutive` free ports on 127.0.0.1, below the ephemeral range. A port the OS
    picks (bind to 0) comes from that range, where every outgoing connection takes its own: between
    the check and the broker's bind, a client elsewhere on the machine could take it (parallel tests
    did, for a cluster's second port)."""
    high = _ephemeral_low() - consecutive
    for _ in range(200):
        base = random.randint(min(20000, high - 1000), high)
        if all(_binds(base + i) for i in range(consecutive)):
            return base
    raise BrokerError(f"no {consecutive} consecutive free ports below {high + consecutive} on 127.0.0.1")


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class LocalBroker:
    """One combined broker+controller. State (pid file, log, data) lives in `data_dir`.

    Alone it is a one-node cluster; LocalCluster makes several of them one quorum by giving each its
    node id, the voters (node id -> controller port) and the cluster id before they are formatted."""

    port: int = 9092
    data_dir: Path = None  # type: ignore[assignment]  # default: under cache_dir, set in __post_init__
    cache_dir: Path = None  # type: ignore[assignment]  # default: the user's cache, set in __post_init__
    heap: str = "512m"
    # A second listener, SASL_PLAINTEXT with PLAIN and SCRAM-SHA-256/512, for trying and testing
    # authenticated clients; `sasl_users` maps user names to passwords for every mechanism.
    sasl_port: int | None = None
    sasl_users: dict[str, str] | None = None
    # A third, SSL listener that requires client certificates (mTLS), with certificates made at
    # start in DATA_DIR/tls (see tls_files after start).
    ssl_port: int | None = None
    node_id: int = 1
    voters: dict[int, int] | None = None  # node id -> controller port; None: this node alone
    cluster_id: str | None = None  # None: a new one when formatting
    tls_dir: Path | None = None  # where the TLS files are made; shared by a cluster's nodes
    # Access control: the client port speaks SASL only, KRaft's StandardAuthorizer allows only what
    # ACLs grant, and a super user `admin` (PLAIN, password made here, kept in the state file) runs
    # the brokers' own traffic and creates users and ACLs (`abq kafka acl`).
    acl: bool = False
    admin_password: str | None = None

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        self.data_dir = Path(self.data_dir or self.cache_dir / f"kafka-{self.port}")
        self.tls_files: Any = None  # TlsFiles, made when TLS is asked for
        self.process: subprocess.Popen | None = None  # set by launch() in this process

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def pid(self) -> int | None:
        """The broker's pid, if it runs. A stale pid file whose number now belongs to another
        process is not ours: the command line must be Kafka's, so `down` never signals a stranger."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid  # no /proc (macOS): trust the pid file
        return pid if b"kafka.Kafka" in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None and port_open("127.0.0.1", self.port)

    def admin_config(self) -> dict[str, Any]:
        """kafka-python keyword arguments for this node's admin connection."""
        cfg: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.acl:
            # PLAIN in the clear, on the loopback, to bootstrap the SCRAM users: nothing to warn about.
            logging.getLogger("kafka.net.sasl.plain").setLevel(logging.ERROR)
            cfg |= {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_plain_username": ADMIN_USER,
                "sasl_plain_password": self.admin_password,
            }
        return cfg

    def _acl_props(self) -> dict[str, str]:
        admin = f'username="{ADMIN_USER}" password="{self.admin_password}" user_{ADMIN_USER}="{self.admin_password}"'
        plain = f"org.apache.kafka.common.security.plain.PlainLoginModule required {admin};"
        return {
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain,
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": _SCRAM_JAAS,
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": _SCRAM_JAAS,
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN_USER}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _write_config(self, cport: int) -> Path:
        logs = self.data_dir / "logs"
        listeners = [f"{'SASL_PLAINTEXT' if self.acl else 'PLAINTEXT'}://127.0.0.1:{self.port}"]
        voters = self.voters or {self.node_id: cport}
        # Kafka's own topics (offsets, transactions) as production runs them once there are three
        # nodes: a copy on each, and a write needs two of them, so one node can fail without loss.
        replicas, min_isr = str(min(3, len(voters))), "2" if len(voters) >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(f"{n}@127.0.0.1:{p}" for n, p in sorted(voters.items())),
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": f"CONTROLLER:{'SASL_PLAINTEXT' if self.acl else 'PLAINTEXT'},"
            "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            # A single-node dev broker: a consumer joining should not wait for others that never come.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        if self.acl:
            props.update(self._acl_props())
        elif self.sasl_port:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            users = " ".join(f'user_{u}="{pw}"' for u, pw in (self.sasl_users or {}).items())
            props["sasl.enabled.mechanisms"] = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
            props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
            for mech in ("scram-sha-256", "scram-sha-512"):
                props[f"listener.name.sasl_plaintext.{mech}.sasl.jaas.config"] = _SCRAM_JAAS
        if self.ssl_port:
            from abqueue.localkafka.tls import make_tls_files

            self.tls_files = make_tls_files(self.tls_dir or self.data_dir / "tls")
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
            props.update(
                {
                    "listener.name.ssl.ssl.keystore.type": "PEM",
                    "listener.name.ssl.ssl.keystore.location": str(self.tls_files.broker_keystore),
                    "listener.name.ssl.ssl.truststore.type": "PEM",
                    "listener.name.ssl.ssl.truststore.location": str(self.tls_files.ca),
                    "listener.name.ssl.ssl.client.auth": "required",
                }
            )
        props["listeners"] = ",".join([*listeners, f"CONTROLLER://127.0.0.1:{cport}"])
        props["advertised.listeners"] = ",".join(listeners)
        cfg = self.data_dir / "server.properties"
        write_private(cfg, "".join(f"{k}={v}\n" for k, v in props.items()))  # PLAIN's passwords are in it
        return cfg

    def _java(self, jars: Path, main: str, *args: str) -> list[str]:
        log4j = resources.files("abqueue.localkafka").joinpath("log4j2.properties")
        return [
            "java",
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dabq.kafka.logfile={self.log_file}",
            "-cp",
            f"{jars / 'libs'}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0, log=print, fresh: bool = False) -> str:
        """Start the broker on the data it has (a new dir is formatted first); `fresh` wipes it."""
        if fresh:
            self.reset()
        if self.running():
            return self.bootstrap
        formatted = self.launch(log=log)
        self.wait_ready(timeout, add_users=formatted)
        return self.bootstrap

    def launch(self, log=print) -> bool:
        """Start the process without waiting for it to answer; True if its storage was formatted now.
        A node of a cluster answers only once a majority of the quorum runs, so a cluster launches
        every node before it waits for any."""
        for port in (self.port, self.sasl_port, self.ssl_port):
            if port and port_open("127.0.0.1", port):
                raise BrokerError(
                    f"port {port} is taken by another process; pick a free one with --port/--sasl-port/--ssl-port or stop that process"
                )
        jars = fetch_jars(self.cache_dir, log=log)
        state = self._stored_state()
        if state is None:
            cfg = self._format(jars)
        else:
            # Topics, committed offsets, live configs and rollout state are all in the storage kept
            # here; it opens only with the quorum configuration it was formatted with.
            if state["users"] != self._users_fingerprint():
                raise BrokerError(
                    f"the SASL users differ from those {self.data_dir} was made with; start with the same "
                    "--sasl-user flags, or `abq kafka up --fresh` to wipe the data and start over"
                )
            if port_open("127.0.0.1", state["controller_port"]):
                raise BrokerError(
                    f"port {state['controller_port']}, the controller port kept in {self.data_dir}, is taken by "
                    "another process; stop it, or `abq kafka up --fresh` to wipe the data and start over"
                )
            if bool(state.get("acl")) != self.acl:
                raise BrokerError(
                    f"{self.data_dir} was made {'with' if state.get('acl') else 'without'} --acl; start it the same "
                    "way, or `abq kafka up --fresh` to wipe the data and start over"
                )
            self.admin_password = state.get("admin_password")
            self.voters = {int(n): p for n, p in state.get("voters", {}).items()} or None
            self.node_id = state.get("node_id", self.node_id)
            cfg = self._write_config(state["controller_port"])
            if self.node_id == 1:
                log(f"reusing the data in {self.data_dir} (wipe it with `abq kafka reset`)")
        out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 (the broker process writes to it)
        self.process = subprocess.Popen(
            self._java(jars, "kafka.Kafka", str(cfg)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `abq kafka up`; `abq kafka down` stops it
        )
        self.pid_file.write_text(str(self.process.pid))
        return state is None

    def wait_ready(self, timeout: float = 90.0, add_users: bool = False) -> None:
        """Wait until the launched broker answers metadata requests; stop it if it never does."""
        proc = self.process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BrokerError(f"the broker exited with code {proc.returncode} during start-up; see {self.log_file}")
            if port_open("127.0.0.1", self.port) and self._answers_metadata():
                if add_users:
                    try:
                        self._add_scram_users()
                    except Exception:
                        self.stop()
                        raise
                return
            time.sleep(0.3)
        self.stop()
        raise BrokerError(f"the broker did not answer within {timeout:.0f}s; see {self.log_file}")

    def send_signal(self, sig: int) -> None:
        """Send a signal to the broker process (tests and the chaos soak: SIGKILL, SIGSTOP, SIGCONT)."""
        pid = self.pid()
        if pid is None:
            raise BrokerError(f"no broker of {self.data_dir} runs")
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            _wait_gone(pid, 10.0)
            self.pid_file.unlink(missing_ok=True)

    def _answers_metadata(self) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(**self.admin_config(), request_timeout_ms=3000)
        except (KafkaError, OSError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()

    def _stored_state(self) -> dict | None:
        """What a restart reuses, if this data dir holds formatted storage made here."""
        marker = self.data_dir / DATA_DIR_MARKER
        if self.data_dir.exists() and any(self.data_dir.iterdir()) and not marker.exists():
            raise BrokerError(
                f"data dir {self.data_dir} is not empty and was not made by abqueue; pass an empty or new --data-dir"
            )
        try:
            state = json.loads((self.data_dir / STATE_FILE).read_text())
            if (self.data_dir / "logs" / "meta.properties").exists():
                return state
        except (OSError, ValueError):
            pass
        return None

    def _users_fingerprint(self) -> str:
        users = sorted((self.sasl_users or {}).items()) if self.sasl_port or self.acl else []
        return hashlib.sha256(json.dumps(users).encode()).hexdigest()

    def _format(self, jars: Path) -> Path:
        """Wipe (only a directory this class made: --data-dir may point anywhere) and format anew."""
        self.reset()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # its files hold the SASL users' passwords and the TLS keys
        (self.data_dir / DATA_DIR_MARKER).write_text(
            "made by abqueue's local broker; kept across restarts, wiped by `abq kafka reset` or `up --fresh`\n"
        )
        if self.acl and not self.admin_password:
            self.admin_password = secrets.token_urlsafe(24)
        cport = (self.voters or {}).get(self.node_id) or free_port()
        cfg = self._write_config(cport)
        cluster_id = self.cluster_id or new_cluster_id()
        # No --add-scram: a command line is visible to every user of the machine. The SCRAM users
        # are added once the broker runs (add_scram_users), through the admin API.
        fmt = subprocess.run(
            self._java(jars, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg)),
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise BrokerError(
                f"formatting KRaft storage failed: {(fmt.stderr or fmt.stdout).strip().splitlines()[-1:]}; see {self.log_file}"
            )
        state = {
            "cluster_id": cluster_id,
            "controller_port": cport,
            "users": self._users_fingerprint(),
            "node_id": self.node_id,
            "voters": self.voters or {},
            "acl": self.acl,
            "admin_password": self.admin_password,  # the file is the owner's alone (0600)
        }
        write_private(self.data_dir / STATE_FILE, json.dumps(state))
        return cfg

    def _add_scram_users(self) -> None:
        """SCRAM credentials for the SASL users (PLAIN reads them from server.properties); stored in
        the cluster's metadata, so kept across restarts."""
        self.add_scram_users((self.sasl_users or {}) if self.sasl_port or self.acl else {})

    def add_scram_users(self, users: dict[str, str]) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

        if not users:
            return
        admin = KafkaAdminClient(**self.admin_config(), request_timeout_ms=10_000)
        errors: dict[str, str] = {}
        try:
            # One request per mechanism: the broker refuses two changes to one user in a request.
            for mech in (ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512):
                upserts = [UserScramCredentialUpsertion(user, mech, pw) for user, pw in users.items()]
                errors |= {u: e for u, e in admin.alter_user_scram_credentials(upserts).items() if e}
        finally:
            admin.close()
        if errors:
            raise BrokerError(f"could not add SCRAM users {sorted(errors)}: {next(iter(errors.values()))}")

    def reset(self) -> bool:
        """Stop the broker and delete its data; False if there was none. Only a directory this class
        made (it holds the marker) is ever deleted."""
        self.stop()
        return wipe(self.data_dir)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after `timeout`). False if none was running."""
        pid = self.terminate()
        if pid is None:
            return False
        self.wait_stopped(pid, timeout)
        return True

    def terminate(self) -> int | None:
        """Ask the broker to stop without waiting (a cluster asks all its nodes at once: a node left
        last, alone, would wait for a quorum to let it shut down); its pid, or None if none ran."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)  # a SIGSTOPped broker cannot act on SIGTERM
            os.kill(pid, signal.SIGTERM)
        return pid

    def wait_stopped(self, pid: int, timeout: float = 30.0) -> None:
        if not _wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)


def wipe(data_dir: Path) -> bool:
    """Delete a data directory, only one abqueue made (it holds the marker); False if it was empty."""
    if not data_dir.exists() or not any(data_dir.iterdir()):
        return False
    if not (data_dir / DATA_DIR_MARKER).exists():
        raise BrokerError(f"data dir {data_dir} was not made by abqueue; it is left as it is")
    shutil.rmtree(data_dir)
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reap(pid) or not alive(pid):
            return True
        time.sleep(0.1)
    return False


def alive(pid: int) -> bool:
    """A zombie is not alive: a process that `abq kafka up` or `abq k8s up` started (and then exited)
    belongs to PID 1 once stopped, and a container's PID 1 may never reap it; kill(pid, 0) still finds it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(pid, 0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def reap(pid: int) -> bool:
    """Collect the process if it is our child and has exited (a zombie would look alive to kill(pid, 0))."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold passwords), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(text)
