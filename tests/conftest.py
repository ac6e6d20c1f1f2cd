"""Fixtures: a real Kafka broker (KAFKA_BOOTSTRAP_SERVERS, else testcontainers where Docker answers,
else the local KRaft broker from Maven jars) and helpers to run workers against it."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from kafkaio import KafkaSettings, ensure_topics
from schemas import ExperimentConfig, VariantConfig

REPO = Path(__file__).resolve().parent.parent


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kc:
            yield kc.get_bootstrap_server()
        return
    from localkafka import LocalBroker
    from localkafka.broker import free_port

    broker = LocalBroker(port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def settings(kafka_bootstrap) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


def new_experiment(variants=(("a", 90), ("b", 10)), partitions: int = 2, **engine_args) -> ExperimentConfig:
    """An experiment with a fresh name, so tests never see each other's topics or groups."""
    return ExperimentConfig(
        name=f"t{uuid.uuid4().hex[:10]}",
        variants=[VariantConfig(name=n, weight=w, engine="echo", model=f"echo-{n}", engine_args=dict(engine_args)) for n, w in variants],
        partitions=partitions,
    )


@pytest.fixture
def experiment(settings) -> ExperimentConfig:
    exp = new_experiment()
    ensure_topics(settings, exp)
    return exp


def write_config(exp: ExperimentConfig, directory: Path) -> Path:
    path = directory / f"{exp.name}.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


class ThreadWorker:
    """A Worker in a thread of the test process: for tests that need no signals or kill -9."""

    def __init__(self, settings, exp, variant, **kw):
        from workers.engine import make_engine
        from workers.worker import Worker

        self.worker = Worker(settings, exp, variant, make_engine(exp.variant(variant)), **kw)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.worker

    def __exit__(self, *exc):
        self.worker.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "worker did not stop within 30s"


@pytest.fixture
def thread_worker(settings):
    def make(exp, variant, **kw):
        return ThreadWorker(settings, exp, variant, **kw)

    return make


def abq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "abqueue_cli.main", *args]


@pytest.fixture
def spawn_worker(kafka_bootstrap, tmp_path):
    """Start `abq worker` processes; they are killed at the end of the test if still running."""
    procs: list[subprocess.Popen] = []

    def spawn(exp: ExperimentConfig, variant: str, *extra: str, log_name: str | None = None) -> subprocess.Popen:
        cfg = write_config(exp, tmp_path)
        log = open(tmp_path / (log_name or f"worker-{variant}-{len(procs)}.log"), "wb")
        env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap, "PYTHONUNBUFFERED": "1", "ABQ_LOG_LEVEL": "DEBUG"}
        # A session of its own, so teardown can reach vLLM's engine processes too: they outlive a
        # worker that is SIGKILLed (they are reparented to init, holding memory and CPU).
        proc = subprocess.Popen(abq_cmd("worker", "--config", str(cfg), "--variant", variant, *extra),
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        proc.log_path = Path(log.name)
        procs.append(proc)
        return proc

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.terminate()  # a drain closes the engine, and vLLM's processes with it
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the session, orphans included
        except ProcessLookupError:
            pass
        p.wait()
