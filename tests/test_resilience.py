"""A broker that stops answering for longer than the group's session timeout (SIGSTOP, as a network
partition or a long GC pause looks to clients): the worker rides it out and every request is answered."""

import os
import signal
import time

from conftest import ThreadWorker, new_experiment

from abqueue.kafka import KafkaSettings, ensure_topics
from abqueue.localkafka import LocalBroker
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import InferenceRequest


def test_worker_survives_a_broker_that_stops_answering_for_12_seconds(tmp_path):
    broker = LocalBroker(port=free_port(), data_dir=tmp_path / "kafka")
    broker.start()
    try:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap)
        # 4 at a time, 100 ms each: 300 requests take about 7.5 s, so the freeze lands mid-stream.
        exp = new_experiment(variants=(("a", 100),), latency_ms=100)
        ensure_topics(settings, exp)
        with (
            ThreadWorker(settings, exp, "a", max_batch=8, max_inflight=4) as worker,
            AbqClient(settings, exp) as client,
        ):
            ids = set()
            for i in range(300):
                req, _ = client.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{i}", prompt=f"p {i}"))
                ids.add(req.id)
            client.publisher.flush()
            got = {}
            deadline = time.monotonic() + 60
            while len(got) < 60 and time.monotonic() < deadline:
                got.update((r.response.request_id, r) for r in client.listener.poll(timeout_ms=100))
            os.kill(broker.pid(), signal.SIGSTOP)
            before = len(got)
            assert 0 < before < len(ids) / 2, f"{before} of {len(ids)} answered before the freeze: not mid-stream"
            try:
                time.sleep(12)  # longer than the worker's 10 s session timeout
            finally:
                os.kill(broker.pid(), signal.SIGCONT)
            got.update(client.wait(ids - set(got), timeout=120))
            assert not worker.stopping
        assert set(got) == ids  # including the half or more that were still queued during the freeze
    finally:
        broker.stop()
