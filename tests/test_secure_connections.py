"""SASL and TLS: workers and clients authenticate with PLAIN, SCRAM and client certificates against a
real broker's SASL_PLAINTEXT and SSL (mTLS) listeners."""

import os
import subprocess

import pytest
from conftest import REPO, ThreadWorker, abq_cmd, new_experiment

from abqueue.kafka import KafkaSettings, ensure_topics
from abqueue.localkafka import LocalBroker
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import InferenceRequest

USER, PASSWORD = "svc-abq", "s3cret-pw"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    broker = LocalBroker(
        port=free_port(),
        sasl_port=free_port(),
        sasl_users={USER: PASSWORD},
        ssl_port=free_port(),
        data_dir=tmp_path_factory.mktemp("secure-kafka"),
    )
    broker.start()
    yield broker
    broker.stop()


def _sasl(broker, mechanism):
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{broker.sasl_port}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username=USER,
        sasl_password=PASSWORD,
    )


def _mtls(broker):
    t = broker.tls_files
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{broker.ssl_port}",
        security_protocol="SSL",
        ssl_cafile=t.ca,
        ssl_certfile=t.client_cert,
        ssl_keyfile=t.client_key,
    )


@pytest.mark.parametrize("how", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "mTLS"])
def test_worker_and_client_over_authenticated_connections(sasl_broker, how):
    settings = _mtls(sasl_broker) if how == "mTLS" else _sasl(sasl_broker, how)
    exp = new_experiment(variants=(("a", 100),), partitions=1)
    ensure_topics(settings, exp)
    with ThreadWorker(settings, exp, "a"), AbqClient(settings, exp) as client:
        reply = client.submit(InferenceRequest(experiment=exp.name, routing_key="u", prompt="over sasl"), timeout=30)
    assert reply.response.ok and reply.response.outputs == ["over sasl"]


def test_refused_credentials_are_one_line_naming_the_settings_to_check(sasl_broker):
    env = {
        **os.environ,
        "ABQ_BOOTSTRAP_SERVERS": f"127.0.0.1:{sasl_broker.sasl_port}",
        "ABQ_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ABQ_SASL_MECHANISM": "SCRAM-SHA-256",
        "ABQ_SASL_USERNAME": USER,
        "ABQ_SASL_PASSWORD": "wrong-password",
    }
    r = subprocess.run(
        abq_cmd("submit", "--routing-key", "u", "--prompt", "p"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("abq: error:")]
    assert len(errors) == 1 and "refused or did not understand this client" in errors[0]
    assert "wrong-password" not in r.stderr


def test_tls_without_a_client_certificate_is_refused_in_one_line(sasl_broker):
    env = {
        **os.environ,
        "ABQ_BOOTSTRAP_SERVERS": f"127.0.0.1:{sasl_broker.ssl_port}",
        "ABQ_SECURITY_PROTOCOL": "SSL",
        "ABQ_SSL_CAFILE": str(sasl_broker.tls_files.ca),
    }
    r = subprocess.run(
        abq_cmd("submit", "--routing-key", "u", "--prompt", "p"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("abq: error:")]
    assert len(errors) == 1, r.stderr
    assert "refused or did not understand this client (protocol SSL" in errors[0]
    assert "Traceback" not in r.stderr
