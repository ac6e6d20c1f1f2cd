"""Shared by the benchmarks: a broker to run on, and worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abqueue.analysis.stats import percentile  # noqa: F401 (the one percentile: nearest rank)
from abqueue.localkafka import LocalBroker
from abqueue.localkafka.broker import free_port


def bootstrap():
    """(address, broker we started or None): ABQ_/KAFKA_BOOTSTRAP_SERVERS if set, else a local broker."""
    addr = os.environ.get("ABQ_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if addr:
        return addr, None
    broker = LocalBroker(port=free_port(), data_dir=Path("/tmp") / f"abq-bench-{uuid.uuid4().hex[:6]}")
    return broker.start(log=lambda m: print(m, file=sys.stderr)), broker


def start_worker(exp, bootstrap_servers: str, variant: str, *flags: str) -> subprocess.Popen:
    cfg = Path("/tmp") / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": bootstrap_servers, "ABQ_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "abqueue.cli.main", "worker", "--config", str(cfg), "--variant", variant, *flags],
        env=env,
    )
