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
    # kafka-python retries the handshake and logs each failure: repeats are folded, so the one line
    # that names the fix is not buried (issue 12: about 60 lines before it).
    assert len(r.stderr.splitlines()) <= 8, r.stderr
    quiet = subprocess.run(
        abq_cmd("--log-level", "ERROR", "submit", "--routing-key", "u", "--prompt", "p"),
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert quiet.returncode == 2 and " WARNING " not in quiet.stderr, quiet.stderr  # kafka-python obeys it too


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


def test_passwords_never_reach_a_log_a_command_line_or_a_world_readable_file(sasl_broker, caplog, monkeypatch):
    import logging
    import stat

    from abqueue.kafka import admin_client
    from abqueue.localkafka import broker as local

    # abqueue used as a library, logging at DEBUG: kafka-python logs the admin client's whole config.
    with caplog.at_level(logging.DEBUG, logger="kafka"):
        admin_client(_sasl(sasl_broker, "SCRAM-SHA-512")).close()
    assert caplog.records and not [r for r in caplog.records if PASSWORD in r.getMessage()]

    for name in ("server.properties", local.STATE_FILE):
        mode = (sasl_broker.data_dir / name).stat().st_mode
        assert not mode & (stat.S_IRWXG | stat.S_IRWXO), f"{name} is readable by others: {oct(mode)}"

    # Formatting storage runs a Java tool: its command line is visible to every user of the machine.
    commands = []

    def run(cmd, **kw):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stopped here by the test")

    monkeypatch.setattr(local.subprocess, "run", run)
    fresh = LocalBroker(port=free_port(), sasl_port=free_port(), sasl_users={USER: PASSWORD},
                        data_dir=sasl_broker.data_dir.parent / "format-only")  # fmt: skip
    with pytest.raises(local.BrokerError):
        fresh._format(local.fetch_jars(fresh.cache_dir, log=lambda *a: None))
    assert commands and not [c for c in commands if PASSWORD in " ".join(c)]


def test_local_broker_users_can_come_from_the_environment_instead_of_the_command_line(monkeypatch):
    from abqueue.cli.kafka_cmd import sasl_users
    from abqueue.cli.main import build_parser

    monkeypatch.setenv("ABQ_KAFKA_SASL_USERS", "svc:one,ops:two")
    args = build_parser().parse_args(["kafka", "up", "--sasl-port", "9093"])
    assert sasl_users(args) == ["svc:one", "ops:two"]
    args = build_parser().parse_args(["kafka", "up", "--sasl-port", "9093", "--sasl-user", "cli:three"])
    assert sasl_users(args) == ["cli:three"]  # the flag wins, as everywhere
