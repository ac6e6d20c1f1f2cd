"""Least privilege on a real broker (`abq kafka up --acl`, KRaft's StandardAuthorizer): each role,
with the ACLs `abq kafka acl` gives it (the same ones the rendered KafkaUsers carry), can do its job
and is refused what it must not do, in one clear line, and nothing crashes."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO, ThreadWorker, abq_cmd, new_experiment, write_config
from kafka.admin import ConfigResource, ConfigResourceType
from kafka_helpers import wait_until
from pydantic import SecretStr

from abqueue.kafka import KafkaSettings, admin_client, ensure_topic, ensure_topics
from abqueue.kafka.acls import user_name
from abqueue.localkafka.broker import free_port
from abqueue.localkafka.cluster import read_env
from abqueue.scaling.plan import read_situation
from producers import AbqClient
from schemas import ConfigError, InferenceRequest

EXP = new_experiment(variants=(("a", 100),), partitions=2)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    data = tmp_path_factory.mktemp("acl")
    where = ("--port", str(free_port()), "--data-dir", str(data / "kafka"))
    cfg = write_config(EXP, data)
    try:
        for args in (("up", "--acl"), ("acl", "--config", str(cfg), "--client", "web", "--client", "other")):
            proc = subprocess.run(abq_cmd("kafka", *args, *where), capture_output=True, text=True, cwd=REPO)
            assert proc.returncode == 0, proc.stderr
        yield data / "kafka", cfg
    finally:
        subprocess.run(abq_cmd("kafka", "down", *where), capture_output=True, cwd=REPO)


def env_of(broker, role: str, name: str | None = None) -> dict[str, str]:
    path = broker[0] / "users" / f"{user_name(EXP, role, name)}.env"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return read_env(path)


def settings_of(broker, role: str, name: str | None = None) -> KafkaSettings:
    env = env_of(broker, role, name)
    return KafkaSettings(
        bootstrap_servers=env["ABQ_BOOTSTRAP_SERVERS"],
        security_protocol=env["ABQ_SECURITY_PROTOCOL"],
        sasl_mechanism=env["ABQ_SASL_MECHANISM"],
        sasl_username=env["ABQ_SASL_USERNAME"],
        sasl_password=SecretStr(env["ABQ_SASL_PASSWORD"]),
    )


def abq_as(broker, role: str, *args: str, name: str | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ABQ_")}, **env_of(broker, role, name)}
    return subprocess.run(abq_cmd(*args), capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_the_acl_recipe_works_as_written_the_operator_creating_the_topics(broker):
    """The worker role may not create topics and no command created an experiment's topics as the
    operator (the tests called ensure_topics from Python); a worker's refusal was a 2,322-character
    line holding the raw request's repr. (First in this module: the topics do not exist yet.)"""
    early = abq_as(broker, "worker", "worker", "--config", str(broker[1]), "--variant", "a", name="a")
    assert early.returncode == 2 and "Traceback" not in early.stderr, early.stderr
    (line,) = [x for x in early.stderr.splitlines() if x.startswith("abq: error:")]
    assert len(line) < 400 and "`abq experiment apply FILE --create-topics`" in line, line
    assert user_name(EXP, "worker", "a") in line
    applied = abq_as(broker, "operator", "experiment", "apply", str(broker[1]), "--create-topics")
    assert applied.returncode == 0, applied.stderr
    assert f"created 7 topics of {EXP.name}" in applied.stdout and "applied" in applied.stdout, applied.stdout


def test_no_role_less_client_gets_in(broker):
    admin_env = read_env(broker[0] / "admin.env")
    anonymous = KafkaSettings(bootstrap_servers=admin_env["ABQ_BOOTSTRAP_SERVERS"])  # PLAINTEXT: no SASL
    with pytest.raises(Exception, match="refused or did not understand"):
        admin_client(anonymous)


def test_each_role_does_its_job_and_is_refused_the_rest(broker):
    operator, worker = settings_of(broker, "operator"), settings_of(broker, "worker", "a")
    web, keda = settings_of(broker, "producer", "web"), settings_of(broker, "keda")
    # The operator created the experiment's topics and published its config (the recipe, below).
    assert not ensure_topics(operator, EXP)
    # A producer creates its own reply topic; a worker answers there.
    inbox = f"abq.{EXP.name}.replies.web.inbox"
    assert ensure_topic(web, inbox, partitions=1)
    with ThreadWorker(worker, EXP, "a") as running, AbqClient(web, EXP, reply_topic=inbox) as client:
        ids = set()
        for i in range(20):
            req, _ = client.publish(
                InferenceRequest(experiment=EXP.name, routing_key=f"u{i}", prompt="hi", reply_to=inbox)
            )
            ids.add(req.id)
        assert set(client.wait(ids, timeout=60)) == ids
        # KEDA reads the lag it scales on.
        situation = read_situation(keda, EXP)
        assert situation["variants"]["a"]["triggers"]

        # Refused, each in one line: a producer reading another client's replies or everyone's responses,
        other = f"abq.{EXP.name}.replies.other.inbox"
        assert ensure_topic(operator, other, partitions=1)
        for topic in (other, EXP.response_topic):
            with pytest.raises(ConfigError, match=f"not allowed to read {topic}"):
                AbqClient(web, EXP, reply_topic=topic)
        # a producer writing the experiment's config (a changed one: an unchanged one is not written), a worker too,
        (broker[1].parent / "changed").mkdir()
        changed = write_config(EXP.model_copy(update={"partitions": 3}), broker[1].parent / "changed")
        for role, name in (("producer", "web"), ("worker", "a")):
            refused = abq_as(broker, role, "experiment", "apply", str(changed), name=name)
            assert refused.returncode == 2, refused.stderr
            assert "Traceback" not in refused.stderr
            (line,) = [x for x in refused.stderr.splitlines() if x.startswith("abq: error:")]
            assert "abq: error: Kafka refused" in line and user_name(EXP, role, name) in line
        # a worker altering a topic's configs.
        admin = admin_client(worker)
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, EXP.response_topic, configs={"retention.ms": "1"})
            # kafka-python answers per resource instead of raising.
            assert "TopicAuthorizationFailedError" in admin.alter_configs([resource])["topic"][EXP.response_topic]
        finally:
            admin.close()
        # Nothing crashed: the worker still answers.
        req, _ = client.publish(InferenceRequest(experiment=EXP.name, routing_key="after", prompt="hi", reply_to=inbox))
        assert set(client.wait({req.id}, timeout=60)) == {req.id}
        assert not running.stopping


def test_a_worker_with_a_user_of_another_role_stops_with_one_line(broker):
    # KEDA's user may describe the variant's group but not join it.
    proc = abq_as(broker, "keda", "worker", "--config", str(broker[1]), "--variant", "a", "--metrics-port", "0")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("abq: error:")]
    assert line.startswith(
        f"abq: error: Kafka refused access to a consumer group to user {user_name(EXP, 'keda')} "
        f"(GroupAuthorizationFailedError: {EXP.consumer_group('a')})"
    )


def test_status_of_a_broker_with_acls_reads_it_as_the_super_user(broker):
    from abqueue.localkafka import LocalCluster

    port = int(read_env(broker[0] / "admin.env")["ABQ_BOOTSTRAP_SERVERS"].rpartition(":")[2])
    st = LocalCluster.kept(port, broker[0]).status()
    assert [n.running for n in st.nodes] == [True]
    assert st.controller == 1  # before: read without credentials, no answer, no controller


def test_an_exactly_once_worker_needs_nothing_beyond_its_role(broker):
    # Its transactional id is "<group>.<worker id>", under the role's transactionalId prefix; its
    # offsets go through the transaction, under the group's Read.
    worker, web = settings_of(broker, "worker", "a"), settings_of(broker, "producer", "web")
    ensure_topics(settings_of(broker, "operator"), EXP)
    inbox = f"abq.{EXP.name}.replies.web.eos"
    ensure_topic(web, inbox, partitions=1)
    with (
        ThreadWorker(worker, EXP, "a", delivery="exactly-once") as running,
        AbqClient(web, EXP, reply_topic=inbox) as client,
    ):
        ids = {
            client.publish(InferenceRequest(experiment=EXP.name, routing_key=f"e{i}", prompt="hi", reply_to=inbox))[
                0
            ].id
            for i in range(10)
        }
        assert set(client.wait(ids, timeout=60)) == ids
        assert not running.stopping


def test_the_gateway_serves_and_runs_batches_with_only_its_role(broker, tmp_path):
    from test_gateway import _client, serving

    operator, worker, gateway = (
        settings_of(broker, "operator"),
        settings_of(broker, "worker", "a"),
        settings_of(broker, "gateway"),
    )
    ensure_topics(operator, EXP)
    applied = abq_as(broker, "operator", "experiment", "apply", str(broker[1]))
    assert applied.returncode == 0, applied.stderr
    with ThreadWorker(worker, EXP, "a"), serving(gateway, [EXP], storage=tmp_path / "s", max_backlog=1000) as url:
        client = _client(url)
        chat = client.chat.completions.create(model=EXP.name, messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "hi"
        lines = b"".join(
            b'{"custom_id": "c%d", "method": "POST", "url": "/v1/completions", "body": {"model": "%s", "prompt": "p"}}\n'
            % (i, EXP.name.encode())
            for i in range(5)
        )
        f = client.files.create(file=("in.jsonl", lines), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
        wait_until(lambda: client.batches.retrieve(b.id).status == "completed", 60, "the batch done", every=0.3)
        assert client.batches.retrieve(b.id).request_counts.completed == 5
    # and nothing beyond its role: everyone's responses, another client's replies.
    other = f"abq.{EXP.name}.replies.other.inbox"
    ensure_topic(operator, other, partitions=1)  # made by the test above when it ran first
    for topic in (other, EXP.response_topic):
        with pytest.raises(ConfigError, match=f"not allowed to read {topic}"):
            AbqClient(gateway, EXP, reply_topic=topic)
