"""Fixtures: a real Kafka broker (KAFKA_BOOTSTRAP_SERVERS, else testcontainers where Docker answers,
else the local KRaft broker from Maven jars) and helpers to run workers against it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from abqueue.kafka import KafkaSettings, ensure_topics
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
    from abqueue.localkafka import LocalBroker
    from abqueue.localkafka.broker import free_port

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
        variants=[
            VariantConfig(name=n, weight=w, engine="echo", model=f"echo-{n}", engine_args=dict(engine_args))
            for n, w in variants
        ],
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
        from workers.engines.factory import make_engine
        from workers.worker import Worker

        self.worker = Worker.from_settings(settings, exp, variant, make_engine(exp.variant(variant)), **kw)
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
    return [sys.executable, "-m", "abqueue.cli.main", *args]


@pytest.fixture
def spawn_worker(kafka_bootstrap, tmp_path):
    """Start `abq worker` processes; they are killed at the end of the test if still running."""
    procs: list[subprocess.Popen] = []

    def spawn(exp: ExperimentConfig, variant: str, *extra: str, log_name: str | None = None) -> subprocess.Popen:
        cfg = write_config(exp, tmp_path)
        log = open(tmp_path / (log_name or f"worker-{variant}-{len(procs)}.log"), "wb")  # noqa: SIM115 (the worker writes it)
        env = {
            **os.environ,
            "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "PYTHONUNBUFFERED": "1",
            "ABQ_LOG_LEVEL": "DEBUG",
        }
        # A session of its own, so teardown can reach vLLM's engine processes too: they outlive a
        # worker that is SIGKILLed (they are reparented to init, holding memory and CPU).
        proc = subprocess.Popen(
            abq_cmd("worker", "--config", str(cfg), "--variant", variant, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
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


# -- the stub transport: fast unit tests of the worker loop, no broker --------------------------------


@pytest.fixture
def stub_broker():
    from workers.transport.stub import StubBroker

    return StubBroker()


class StubWorker:
    """A Worker on the stub broker, in a thread; the experiment's topics are created in the stub."""

    def __init__(self, broker, exp: ExperimentConfig, variant: str, engine=None, delivery: str = "at-least-once", **kw):
        from workers.delivery import make_delivery
        from workers.engines.factory import make_engine
        from workers.worker import Worker

        for v in exp.variants:
            for topic in exp.request_topics(v.name).values():
                broker.create_topic(topic, exp.partitions)
        for topic in (exp.response_topic, exp.deadletter_topic):
            broker.create_topic(topic, exp.partitions)
        self.broker, self.exp = broker, exp
        group = exp.consumer_group(variant)
        self.consumer = broker.consumer(group)

        def producer(transactional: bool):
            self.producer = broker.producer(transactional_id=f"{group}.stub" if transactional else None)
            return self.producer

        strategy = make_delivery(delivery, producer, exp.response_topic, exp.deadletter_topic)
        strategy.retry_after_s = 0.05  # a failed publish or transaction is tried again quickly here
        engine = engine or make_engine(exp.serving(variant)[0])
        kw.setdefault("drain_timeout_s", 0.2)  # tests may leave requests with a manual engine
        self.worker = Worker(exp, variant, engine, self.consumer, strategy, worker_id="stub-worker", **kw)
        self.error: BaseException | None = None  # what ended run(), if it raised
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.worker.run()
        except BaseException as e:
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            # A test that failed while holding commits would leave the transaction thread waiting,
            # and the interpreter waits for it at exit: the run would hang instead of failing.
            self.broker.release_commits()
        self.worker.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "stub worker did not stop within 10s"

    def send(self, variant: str = "a", priority: str = "normal", **fields):
        """Publish a request straight to the variant's topic (as a producer would, variant assigned)."""
        from schemas import InferenceRequest, encode

        fields.setdefault("routing_key", "user-1")
        fields.setdefault("prompt", "hello there world")
        req = InferenceRequest(experiment=self.exp.name, variant=variant, priority=priority, **fields)
        self.broker.produce(self.exp.request_topic(variant, priority), encode(req), key=req.routing_key.encode())
        return req

    def responses(self):
        from schemas import InferenceResponse

        return [InferenceResponse.model_validate_json(r.value) for r in self.broker.records(self.exp.response_topic)]

    def dead_letters(self):
        from schemas import DeadLetter

        return [DeadLetter.model_validate_json(r.value) for r in self.broker.records(self.exp.deadletter_topic)]

    def wait_responses(self, n: int, timeout: float = 5.0):
        self.broker.wait_for(lambda: len(self.broker.records(self.exp.response_topic)) >= n, timeout, f"{n} responses")
        return self.responses()

    def committed(self) -> dict:
        return self.broker.committed.get(self.consumer.group, {})


@pytest.fixture
def stub_worker(stub_broker):
    def make(exp: ExperimentConfig, variant: str = "a", **kw) -> StubWorker:
        return StubWorker(stub_broker, exp, variant, **kw)

    return make


def metric_values(text: str, **labels: str) -> dict[str, float]:
    """Sample values by metric name from Prometheus text format: samples whose labels include
    `labels`, summed over the rest."""
    import re

    out: dict[str, float] = {}
    for name, raw, value in re.findall(r"^([a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', raw or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            out[name] = out.get(name, 0.0) + float(value)
    return out
