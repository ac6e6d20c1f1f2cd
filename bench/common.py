"""Shared by the benchmarks: a broker to run on, and worker processes."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abqueue.analysis.stats import percentile  # noqa: F401 (the one percentile: nearest rank)
from abqueue.localkafka import LocalBroker
from abqueue.localkafka.broker import free_port

_CREATED: list[str] = []  # topic-name prefixes of what this run made on a broker it did not start


def bootstrap():
    """(address, broker we started or None): ABQ_/KAFKA_BOOTSTRAP_SERVERS if set, else a local broker.
    On a broker the benchmark did not start, the topics it made (see `leave_no_trace`) are deleted
    at exit."""
    addr = os.environ.get("ABQ_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if addr:
        atexit.register(_delete_created, addr)
        return addr, None
    broker = LocalBroker(port=free_port(), data_dir=Path("/tmp") / f"abq-bench-{uuid.uuid4().hex[:6]}")
    return broker.start(log=lambda m: print(m, file=sys.stderr)), broker


def leave_no_trace(*prefixes: str) -> None:
    """Delete topics starting with these prefixes at exit, on a broker this run did not start."""
    _CREATED.extend(prefixes)


def _delete_created(addr: str) -> None:
    if not _CREATED:
        return
    from abqueue.kafka import KafkaSettings, admin_client

    try:
        admin = admin_client(KafkaSettings(bootstrap_servers=addr))
        try:
            doomed = [t for t in admin.list_topics() if t.startswith(tuple(_CREATED))]
            if doomed:
                admin.delete_topics(doomed)
                print(f"deleted the {len(doomed)} topics this benchmark made", file=sys.stderr)
        finally:
            admin.close()
    except Exception as e:  # cleanup must not hide the figures printed above
        print(f"could not delete this benchmark's topics ({e}); they start with {', '.join(_CREATED)}", file=sys.stderr)


def echo_experiment(settings, prefix: str, partitions: int):
    """A fresh experiment of one echo variant `a`, its topics created (and deleted at exit on a broker
    this run did not start)."""
    from abqueue.kafka import ensure_topics
    from schemas import ExperimentConfig

    exp = ExperimentConfig(
        name=f"{prefix}{uuid.uuid4().hex[:8]}",
        partitions=partitions,
        variants=[{"name": "a", "weight": 100, "engine": "echo"}],
    )
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    return exp


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (vLLM's engine core runs in a child)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_bytes(p)
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def wait_ready(worker: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Until the worker's /readyz answers 200 (its engine loaded and warmed up): engine start is not
    part of a measurement."""

    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.poll() is None, "the worker exited while starting; see its log above"
        assert time.monotonic() < deadline, f"the worker was not ready within {timeout_s:.0f}s"
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(1)


def start_worker(exp, bootstrap_servers: str, variant: str, *flags: str) -> subprocess.Popen:
    cfg = Path("/tmp") / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": bootstrap_servers, "ABQ_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "abqueue.cli.main", "worker", "--config", str(cfg), "--variant", variant, *flags],
        env=env,
    )
