"""`abq deploy render`: the manifests validate against the Kubernetes, KEDA, Strimzi and prometheus-operator schemas; an
invalid one is caught; the checked-in k8s/ and keda/ are exactly what the example config renders."""

import copy
import subprocess

import pytest
import yaml
from conftest import REPO, abq_cmd

from abqueue.deploy.render import Target, render
from abqueue.deploy.validate import ManifestError, validate_document, validate_files
from schemas import load_experiment

EXAMPLE = REPO / "examples" / "experiment.yaml"
FLAGS = [
    "--bootstrap-servers",
    "kafka-kafka-bootstrap.kafka:9093",
    "--security-protocol",
    "SASL_SSL",
    "--kafka-users",
    "scram-sha-512",
    "--tls-ca-secret",
    "abq-kafka-ca",
    "--models-pvc",
    "models",
]


def _rendered():
    exp = load_experiment(EXAMPLE)
    return exp, render(
        exp,
        Target(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_secret="abq-kafka-user",
            tls_ca_secret="abq-kafka-ca",
            bootstrap_servers="kafka-kafka-bootstrap.kafka:9093",
            models_pvc="models",
        ),
    )


def _doc(files, kind, name_part=""):
    return next(d for docs in files.values() for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"])


def test_every_rendered_resource_validates():
    exp, files = _rendered()
    assert validate_files(files) == 22  # the cancel topic is the new KafkaTopic
    kinds = sorted(d["kind"] for docs in files.values() for d in docs)
    assert kinds.count("Deployment") == kinds.count("ScaledObject") == kinds.count("PodDisruptionBudget") == 2
    assert kinds.count("KafkaTopic") == 2 * 3 + 3  # a topic per variant and priority, responses, dead letters, cancels


@pytest.mark.parametrize(
    "kind,mutate,problem",
    [
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=3),
            "imagePullPolicy",
        ),
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30),
            "terminationGracePeriod",
        ),
        ("ScaledObject", lambda d: d["spec"].update(pollingInterval="15"), "pollingInterval"),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("type"), "type"),
        ("KafkaTopic", lambda d: d["spec"].update(partitions="eight"), "partitions"),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key"), "key"),
        # prometheus-operator's own CRDs: a field of the wrong type, not only a missing one, is caught.
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval=30), "interval"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(**{"for": 5}), "for"),
    ],
)
def test_an_invalid_manifest_is_caught(kind, mutate, problem):
    _, files = _rendered()
    doc = copy.deepcopy(_doc(files, kind))
    validate_document(doc)
    mutate(doc)
    with pytest.raises(ManifestError, match=problem):
        validate_document(doc)


def test_workers_scale_on_their_own_lag_and_drain_before_they_go():
    exp, files = _rendered()
    for v in exp.variants:
        so, dep = _doc(files, "ScaledObject", v.name), _doc(files, "Deployment", v.name)
        assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
            v.scaling.min_replicas,
            v.scaling.max_replicas,
        )
        topics = {t["metadata"]["topic"] for t in so["spec"]["triggers"]}
        assert topics == set(exp.request_topics(v.name).values())
        assert {t["metadata"]["consumerGroup"] for t in so["spec"]["triggers"]} == {exp.consumer_group(v.name)}
        assert all(t["metadata"]["offsetResetPolicy"] == "earliest" for t in so["spec"]["triggers"])  # as the workers
        pod = dep["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > v.scaling.drain_seconds
        assert pod["securityContext"]["runAsNonRoot"] is True
        c = pod["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert (
            c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        )
        assert c["args"][c["args"].index("--variant") + 1] == v.name
        # Every replica KEDA may start has a partition of each priority topic.
        for topic in exp.request_topics(v.name).values():
            kt = next(d for d in files["k8s/kafkatopics.yaml"] if d["spec"]["topicName"] == topic)
            assert kt["spec"]["partitions"] >= v.scaling.max_replicas
    rules = {r["alert"] for r in _doc(files, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert {
        "AbqErrorBudgetFastBurn",
        "AbqErrorBudgetSlowBurn",
        "AbqLatencyP95High",
        "AbqDeadLettersGrowing",
        "AbqLagGrowingAtMaxReplicas",
        "AbqConsumerGroupEmptyWithLag",
    } <= rules


def test_checked_in_manifests_are_what_the_example_renders(tmp_path):
    out = subprocess.run(
        abq_cmd("deploy", "render", "--config", str(EXAMPLE), "--out", str(tmp_path), *FLAGS),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    for sub in ("k8s", "keda"):
        fresh = {p.name: p.read_text() for p in (tmp_path / sub).glob("*.*")}
        checked_in = {p.name: p.read_text() for p in (REPO / sub).glob("*.*")}
        assert fresh == checked_in, (
            f"{sub}/ is stale: rerun abq deploy render --config examples/experiment.yaml --out . {' '.join(FLAGS)}"
        )
        kustomization = yaml.safe_load(fresh["kustomization.yaml"])
        assert sorted(kustomization["resources"]) == sorted(
            n for n in fresh if n.endswith(".yaml") and n != "kustomization.yaml"
        )


def test_dashboard_and_alerts_use_only_metrics_the_worker_exports():
    import json
    import re
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from workers.middleware.metrics import Metrics

    registry = CollectorRegistry()
    worker = SimpleNamespace(
        registry=registry,
        experiment=SimpleNamespace(name="x"),
        variant=SimpleNamespace(name="v"),
        serves="v",
        engine=SimpleNamespace(model="m", stats=lambda: {}),
        admission=SimpleNamespace(waiting=lambda level: 0),
        startup_seconds=1.0,
        inflight=0,
        limit=None,
        max_inflight=512,
        membership=SimpleNamespace(rejoins=0),
    )
    Metrics().before_start(worker)
    exported = {s.name for family in registry.collect() for s in family.samples}
    exported |= {
        family.name + suffix for family in registry.collect() for suffix in ("_bucket", "_count", "_sum", "_total")
    }
    board = json.loads((REPO / "k8s" / "grafana-dashboard.json").read_text())
    used = {m for p in board["panels"] for t in p["targets"] for m in re.findall(r"abq_[a-z_]+", t["expr"])}
    _, files = _rendered()
    rules = _doc(files, "PrometheusRule")["spec"]["groups"][0]["rules"]
    used |= {m for r in rules for m in re.findall(r"abq_[a-z_]+", r["expr"])}
    assert used and used <= exported, used - exported


def test_the_worker_drains_for_the_variant_s_drain_seconds_inside_the_pod_s_grace_period():
    from abqueue.cli.main import build_parser

    exp, files = _rendered()
    for v in exp.variants:
        pod = _doc(files, "Deployment", v.name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = build_parser().parse_args(["worker", *container["args"]])  # the worker's own parser accepts them
        assert args.drain_seconds == v.scaling.drain_seconds
        assert args.follow  # deployed workers take the live config's limits, prompts and sampling
        assert pod["terminationGracePeriodSeconds"] == v.scaling.drain_seconds + 30


def test_an_exactly_once_variant_runs_as_a_statefulset_whose_slots_keep_their_transactional_ids():
    """A Deployment's replacement pod has a new name, so a new transactional id: it never fences the
    killed pod's open transaction, and read_committed readers stall until that times out."""
    exp = load_experiment(EXAMPLE)
    v = exp.variants[0]
    v.deploy.delivery = "exactly-once"
    files = render(exp, Target())
    validate_files(files)
    sts, so = _doc(files, "StatefulSet", v.name), _doc(files, "ScaledObject", v.name)
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    assert sts["spec"]["podManagementPolicy"] == "Parallel" and sts["spec"]["serviceName"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][c["args"].index("--delivery") + 1] == "exactly-once"
    assert c["args"][c["args"].index("--worker-id") + 1] == "$(POD_NAME)"
    pod_name = next(e for e in c["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    other = _doc(files, "Deployment", exp.variants[1].name)  # at-least-once stays a Deployment
    assert "--delivery" not in other["spec"]["template"]["spec"]["containers"][0]["args"]


def test_a_ca_only_secret_is_trusted_without_asking_for_a_client_certificate():
    """The README's example (SASL_SSL with a CA Secret) used to make pods that exit: the worker and
    the TriggerAuthentication also asked the CA Secret for tls.crt and tls.key."""
    exp = load_experiment(EXAMPLE)
    ca_only = render(exp, Target(security_protocol="SSL", tls_ca_secret="kafka-ca", bootstrap_servers="k:9093"))
    validate_files(ca_only)
    c = _doc(ca_only, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ABQ_SSL_CAFILE"].endswith("ca.crt") and "ABQ_SSL_CERTFILE" not in env and "ABQ_SSL_KEYFILE" not in env
    auth = _doc(ca_only, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert [(a["parameter"], a["name"], a["key"]) for a in auth] == [("ca", "kafka-ca", "ca.crt")]
    mtls = render(
        exp,
        Target(security_protocol="SSL", tls_ca_secret="kafka-ca", tls_client_secret="me", bootstrap_servers="k:9093"),
    )
    validate_files(mtls)
    c = _doc(mtls, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ABQ_SSL_CERTFILE"].endswith("tls.crt") and env["ABQ_SSL_KEYFILE"].endswith("tls.key")
    auth = _doc(mtls, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"]) for a in auth} == {("ca", "kafka-ca"), ("cert", "me"), ("key", "me")}


def test_render_needs_the_bootstrap_servers_rather_than_baking_in_a_guess(tmp_path):
    out = subprocess.run(
        abq_cmd("deploy", "render", "--config", str(EXAMPLE), "--out", str(tmp_path)),
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2 and "--bootstrap-servers" in out.stderr and "Traceback" not in out.stderr


def _with_users(kind="scram-sha-512"):
    exp = load_experiment(EXAMPLE)
    files = render(
        exp,
        Target(
            security_protocol="SASL_SSL" if kind != "tls" else "SSL",
            tls_ca_secret="abq-kafka-ca",
            kafka_users=kind,
            clients=["web", "nightly"],
        ),
    )
    return exp, files


def _acls(files, user):
    doc = next(d for d in files["k8s/kafkausers.yaml"] if d["metadata"]["name"] == user)
    return {
        (a["resource"]["type"], a["resource"].get("name"), a["resource"].get("patternType"), op)
        for a in doc["spec"]["authorization"]["acls"]
        for op in a["operations"]
    }


@pytest.mark.parametrize("kind", ["scram-sha-512", "tls"])
def test_kafka_users_validate_against_strimzi_s_crd_and_each_role_gets_only_its_acls(kind):
    exp, files = _with_users(kind)
    validate_files(files)
    users = {d["metadata"]["name"]: d for d in files["k8s/kafkausers.yaml"]}
    assert set(users) == {
        "abq-chat-producer-web",
        "abq-chat-producer-nightly",
        "abq-chat-worker-base",
        "abq-chat-worker-candidate",
        "abq-chat-operator",
        "abq-chat-keda",
        "abq-chat-gateway",
    }
    assert {d["spec"]["authentication"]["type"] for d in users.values()} == {kind}
    web = _acls(files, "abq-chat-producer-web")
    assert ("topic", "abq.chat.base.requests", "literal", "Write") in web
    assert ("topic", "abq.chat.replies.web.", "prefix", "Read") in web
    assert not {a for a in web if a[1] == "abq.chat.replies.nightly." or a[1] == exp.response_topic}
    assert not {a for a in web if a[1] == "abq.experiments" and a[3] != "Read" and a[3] != "Describe"}
    worker = _acls(files, "abq-chat-worker-base")
    assert ("group", "abq.chat.base.workers", "literal", "Read") in worker
    assert ("transactionalId", "abq.chat.base.workers.", "prefix", "Write") in worker
    assert not {a for a in worker if a[3] in ("AlterConfigs", "Alter", "Create", "Delete", "All")}
    assert not {a for a in worker if "candidate" in (a[1] or "")}  # not the other variant's requests
    assert {a[3] for a in _acls(files, "abq-chat-keda")} == {"Describe"}
    # The gateway: a producer whose replies are abq.chat.replies.gateway.*, its own records and group, the lag.
    gateway = _acls(files, "abq-chat-gateway")
    assert ("topic", "abq.chat.replies.gateway.", "prefix", "Read") in gateway
    assert ("topic", "abq._gateway.", "prefix", "Write") in gateway
    assert ("group", "abq._gateway.batch-runners", "literal", "Read") in gateway
    assert ("group", "abq.chat.base.workers", "literal", "Describe") in gateway
    assert ("group", "abq.chat.base.workers", "literal", "Read") not in gateway  # it cannot take a worker's place
    assert not {a for a in gateway if a[1] in (exp.response_topic, "abq.chat.replies.web.")}
    # Each worker uses its own user's Secret, as Strimzi names it.
    env = {e["name"]: e for e in _doc(files, "Deployment", "base")["spec"]["template"]["spec"]["containers"][0]["env"]}
    if kind == "tls":
        volumes = _doc(files, "Deployment", "base")["spec"]["template"]["spec"]["volumes"]
        assert {"name": "kafka-tls-client", "secret": {"secretName": "abq-chat-worker-base"}} in volumes
        assert env["ABQ_SSL_CERTFILE"]["value"].endswith("/client/user.crt")
    else:
        assert env["ABQ_SASL_USERNAME"]["value"] == "abq-chat-worker-base"
        assert env["ABQ_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "abq-chat-worker-base",
            "key": "password",
        }
        auth = _doc(files, "TriggerAuthentication")["spec"]
        assert {"parameter": "password", "name": "abq-chat-keda", "key": "password"} in auth["secretTargetRef"]
        assert auth["configMapTargetRef"] == [{"parameter": "username", "name": "abq-chat-kafka-users", "key": "keda"}]


def test_an_invalid_kafka_user_is_caught():
    _, files = _with_users()
    doc = copy.deepcopy(files["k8s/kafkausers.yaml"][0])
    validate_document(doc)
    doc["spec"]["authorization"]["acls"][0]["operations"] = ["Frobnicate"]
    with pytest.raises(ManifestError, match="operations"):
        validate_document(doc)


def test_the_gateway_renders_valid_and_its_command_line_is_one_abq_gateway_accepts(tmp_path):
    from abqueue.cli.main import build_parser
    from abqueue.deploy.render import GatewayTarget

    exp = load_experiment(EXAMPLE)
    target = Target(
        bootstrap_servers="kafka-kafka-bootstrap.kafka:9093",
        gateway=GatewayTarget("gateway-storage", "gateway-keys", min_replicas=2, max_replicas=5),
    )
    files = render(exp, target)
    assert validate_files(files) > 0
    docs = {d["kind"]: d for d in files["k8s/gateway.yaml"]}
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["args"])
    assert args.command == "gateway" and args.instance == "$(POD_NAME)"  # each pod its own reply topic
    assert args.api_keys is not None and not args.allow_anonymous and args.host == "0.0.0.0"
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "gateway-keys", "defaultMode": 0o400}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "gateway-storage"
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"], hpa["scaleTargetRef"]["name"]) == (
        2, 5, docs["Deployment"]["metadata"]["name"],
    )  # fmt: skip
    # With --kafka-users the gateway runs as its own user, whose KafkaUser has only the gateway's ACLs.
    users = render(exp, Target(bootstrap_servers="b:9093", security_protocol="SASL_SSL", kafka_users="scram-sha-512",
                               gateway=GatewayTarget("gateway-storage")))  # fmt: skip
    validate_files(users)
    env = {e["name"]: e for e in users["k8s/gateway.yaml"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    gateway_user = f"abq-{exp.name}-gateway"
    assert env["ABQ_SASL_USERNAME"]["value"] == gateway_user
    assert env["ABQ_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == gateway_user
    assert gateway_user in {u["metadata"]["name"] for u in users["k8s/kafkausers.yaml"]}
    assert "k8s/gateway.yaml" not in render(exp, Target(bootstrap_servers="b:9092"))


def test_every_principal_gets_its_own_kafka_user_and_reserved_client_names_are_refused():
    """`_` -> `-` and a cut to 63 characters mapped distinct principals to one user (variants gpu_a
    and gpu-a; two long clients), and render wrote two KafkaUsers with one name; a producer client
    named `gateway` got the gateway's reply topics."""
    from abqueue.kafka.acls import principals
    from schemas import ConfigError, ExperimentConfig

    exp = ExperimentConfig.model_validate(
        {"name": "a-rather-long-experiment-name-for-users", "variants": [
            {"name": "gpu_a", "weight": 50}, {"name": "gpu-a", "weight": 50}]}
    )  # fmt: skip
    users = [p.user for p in principals(exp, ["billing-service-a", "billing-service-b"])]
    assert len(set(users)) == len(users), users
    assert all(len(u) <= 63 and u == u.lower() and "_" not in u for u in users)
    files = render(exp, Target(bootstrap_servers="b:9093", security_protocol="SASL_SSL", kafka_users="scram-sha-512"))
    names = [u["metadata"]["name"] for u in files["k8s/kafkausers.yaml"]]
    assert len(set(names)) == len(names) == len(users) - 1  # render has one client, "app"
    plain = ExperimentConfig.model_validate({"name": "chat", "variants": [{"name": "a", "weight": 100}]})
    assert principals(plain, ["svc"])[0].user == "abq-chat-producer-svc"  # valid names stay as they were
    with pytest.raises(ConfigError, match="client name 'gateway' is reserved"):
        principals(plain, ["gateway"])


def test_kafka_users_and_the_sasl_flags_follow_one_rule(tmp_path):
    """--kafka-users scram-sha-512 with --sasl-mechanism demanded --sasl-secret, and then refused it
    ("drop --sasl-secret"): no command line could pass."""
    base = ["deploy", "render", "--config", str(EXAMPLE), "--bootstrap-servers", "b:9093", "--security-protocol", "SASL_SSL"]  # fmt: skip

    def render_with(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(abq_cmd(*base, "--out", str(tmp_path / str(len(flags))), *flags), capture_output=True, text=True, cwd=REPO)  # fmt: skip

    ok = render_with("--kafka-users", "scram-sha-512", "--sasl-mechanism", "SCRAM-SHA-512")
    assert ok.returncode == 0, ok.stderr
    for flags, line in (
        (("--kafka-users", "scram-sha-512", "--sasl-mechanism", "PLAIN"), "makes SCRAM-SHA-512 users; drop --sasl-mechanism PLAIN"),
        (("--kafka-users", "scram-sha-512", "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-secret", "s"), "drop --sasl-secret"),
        (("--sasl-mechanism", "SCRAM-SHA-512"), "--sasl-mechanism needs --sasl-secret"),
    ):  # fmt: skip
        refused = render_with(*flags)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and line in refused.stderr, refused.stderr
