"""Fetch the Kafka broker jars with Maven, format KRaft storage, start, stop and probe the broker."""

from __future__ import annotations

import base64
import hashlib
import json
import os
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
    return target


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalBroker:
    """One combined broker+controller. State (pid file, log, data) lives in `data_dir`."""

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

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        self.data_dir = Path(self.data_dir or self.cache_dir / f"kafka-{self.port}")
        self.tls_files: Any = None  # TlsFiles, made when TLS is asked for

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

    def _write_config(self, cport: int) -> Path:
        logs = self.data_dir / "logs"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A single-node dev broker: a consumer joining should not wait for others that never come.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        if self.sasl_port:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            users = " ".join(f'user_{u}="{pw}"' for u, pw in (self.sasl_users or {}).items())
            props["sasl.enabled.mechanisms"] = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
            props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
            for mech in ("scram-sha-256", "scram-sha-512"):
                props[f"listener.name.sasl_plaintext.{mech}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        if self.ssl_port:
            from abqueue.localkafka.tls import make_tls_files

            self.tls_files = make_tls_files(self.data_dir / "tls")
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
        _write_private(cfg, "".join(f"{k}={v}\n" for k, v in props.items()))  # PLAIN's passwords are in it
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
        for port in (self.port, self.sasl_port, self.ssl_port):
            if port and port_open("127.0.0.1", port):
                raise BrokerError(
                    f"port {port} is taken by another process; pick a free one with --port/--sasl-port/--ssl-port or stop that process"
                )
        jars = fetch_jars(self.cache_dir, log=log)
        state = None if fresh else self._stored_state()
        formatted = state is None
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
            cfg = self._write_config(state["controller_port"])
            log(f"reusing the data in {self.data_dir} (wipe it with `abq kafka reset`)")
        out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 (the broker process writes to it)
        proc = subprocess.Popen(
            self._java(jars, "kafka.Kafka", str(cfg)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `abq kafka up`; `abq kafka down` stops it
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"the broker exited with code {proc.returncode} during start-up; see {self.log_file}")
            if port_open("127.0.0.1", self.port) and self._answers_metadata():
                if formatted:
                    try:
                        self._add_scram_users()
                    except Exception:
                        self.stop()
                        raise
                return self.bootstrap
            time.sleep(0.3)
        self.stop()
        raise BrokerError(f"the broker did not answer within {timeout:.0f}s; see {self.log_file}")

    def _answers_metadata(self) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
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
        users = sorted((self.sasl_users or {}).items()) if self.sasl_port else []
        return hashlib.sha256(json.dumps(users).encode()).hexdigest()

    def _format(self, jars: Path) -> Path:
        """Wipe (only a directory this class made: --data-dir may point anywhere) and format anew."""
        self.reset()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # its files hold the SASL users' passwords and the TLS keys
        (self.data_dir / DATA_DIR_MARKER).write_text(
            "made by abqueue's local broker; kept across restarts, wiped by `abq kafka reset` or `up --fresh`\n"
        )
        cport = free_port()
        cfg = self._write_config(cport)
        cluster_id = new_cluster_id()
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
        state = {"cluster_id": cluster_id, "controller_port": cport, "users": self._users_fingerprint()}
        _write_private(self.data_dir / STATE_FILE, json.dumps(state))
        return cfg

    def _add_scram_users(self) -> None:
        """SCRAM credentials for the SASL users (PLAIN reads them from server.properties); stored in
        the cluster's metadata, so kept across restarts."""
        from kafka import KafkaAdminClient
        from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

        users = (self.sasl_users or {}) if self.sasl_port else {}
        if not users:
            return
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
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
        if not self.data_dir.exists() or not any(self.data_dir.iterdir()):
            return False
        if not (self.data_dir / DATA_DIR_MARKER).exists():
            raise BrokerError(f"data dir {self.data_dir} was not made by abqueue; it is left as it is")
        shutil.rmtree(self.data_dir)
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after `timeout`). False if none was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if _reap(pid):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True


def _reap(pid: int) -> bool:
    """Collect the broker if it is our child (a zombie would look alive to kill(pid, 0))."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold passwords), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(text)
