"""The operator's path on a real control plane (abqueue/k8s): kube-apiserver, kube-controller-manager's
HPA controller and KEDA's own operator, metrics apiserver and admission webhooks, built from source
(scripts/controlplane.sh). What `abq deploy render` writes is applied server-side and accepted; KEDA
drives a variant's Deployment 0 -> 1 -> N -> 1 -> 0 on a real broker's lag, with a real `abq worker`
(outside the cluster: there is no kubelet) catching up; `abq keda plan` agrees with the HPA."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from conftest import REPO, abq_cmd, new_experiment, write_config
from kafka_helpers import wait_until

from abqueue.errors import UsageError
from abqueue.k8s.controlplane import NO_GO_TOOLCHAIN, ControlPlane, build
from abqueue.kafka import ensure_topics
from abqueue.localkafka.broker import alive
from producers.publisher import RequestPublisher
from schemas import ExperimentConfig, InferenceRequest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        bin_dir = build()
    except UsageError as e:
        if str(e) == NO_GO_TOOLCHAIN:
            pytest.skip(f"the control plane is built from Go modules: {e}")
        raise
    cp = ControlPlane(dir=tmp_path_factory.mktemp("k8s"), hpa_sync_s=2)
    cp.start(bin_dir, log=lambda *_: None)
    try:
        yield cp
    finally:
        cp.stop()


def render(cfg: Path, out: Path, *flags: str) -> None:
    r = subprocess.run(
        abq_cmd("deploy", "render", "--config", str(cfg), "--out", str(out), *flags),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr


def rendered(out: Path) -> list[dict]:
    return [
        d
        for p in sorted([*(out / "k8s").glob("*.yaml"), *(out / "keda").glob("*.yaml")])
        if p.name != "kustomization.yaml"
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def test_every_rendered_file_is_applied_server_side_and_keda_takes_each_scaled_object(cluster, tmp_path):
    """Workers (a Deployment and an exactly-once StatefulSet), a pool, the gateway, SCRAM users with
    their ACLs, topics, monitoring: all accepted by the API server and, for the ScaledObjects, by KEDA's
    admission webhook (which fails closed here), and reconciled by its operator."""
    config = yaml.safe_load((REPO / "examples" / "experiment.yaml").read_text())
    config["variants"][1]["deploy"]["delivery"] = "exactly-once"
    config["variants"].append({"name": "pooled", "weight": 0, "pool": "small", "engine": "echo", "model": "echo-small"})
    config["variants"].append({"name": "pooled2", "weight": 0, "pool": "small"})
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ns = f"abq-{uuid.uuid4().hex[:6]}"
    render(
        cfg, tmp_path, "--namespace", ns, "--bootstrap-servers", "kafka-kafka-bootstrap.kafka:9093",
        "--security-protocol", "SASL_SSL", "--kafka-users", "scram-sha-512", "--tls-ca-secret", "abq-kafka-ca",
        "--models-pvc", "models", "--gateway-storage-pvc", "gateway-files", "--client", "app",
    )  # fmt: skip
    docs = rendered(tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "ScaledObject", "KafkaUser", "KafkaTopic", "HorizontalPodAutoscaler"} <= kinds
    cluster.apply(next(d for d in docs if d["kind"] == "Namespace"))
    # What Strimzi's operators write beside a KafkaUser and a Kafka cluster, which KEDA's
    # TriggerAuthentication and the workers read: a Secret per user, and the cluster CA.
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": d["metadata"]["name"], "namespace": ns},
         "stringData": {"password": uuid.uuid4().hex}}
        for d in docs if d["kind"] == "KafkaUser"
    ]  # fmt: skip
    secrets.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "abq-kafka-ca", "namespace": ns},
         "stringData": {"ca.crt": (cluster.pki / "ca.crt").read_text()}}
    )  # fmt: skip
    cluster.apply(secrets)
    for part in ("k8s", "keda"):
        out = cluster.kubectl("apply", "--server-side", "--field-manager=abq", "-k", str(tmp_path / part)).stdout
        assert "serverside-applied" in out
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        got = cluster.get(kind, name, *(["-n", d["metadata"]["namespace"]] if "namespace" in d["metadata"] else []))
        assert got["metadata"]["name"] == name, (kind, name)
    # KEDA reconciles each ScaledObject: it finds its scale target (the exactly-once variant's is a
    # StatefulSet), resolves its TriggerAuthentication (the users' Secrets and the CA) and dials the
    # rendered bootstrap address, which nothing answers here (the live tests below use a real broker
    # and see the HPAs KEDA makes).
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}

    def reconciled() -> bool:
        for so in cluster.get("scaledobject", "-n", ns)["items"]:
            want = scaled[so["metadata"]["name"]]["spec"]["scaleTargetRef"]["kind"]
            ready = next((c for c in so.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})
            if so["status"].get("scaleTargetKind") != f"apps/v1.{want}":
                return False
            if "kafka-kafka-bootstrap.kafka" not in ready.get("message", ""):
                return False
        return True

    wait_until(reconciled, 60, "KEDA to reconcile every ScaledObject as far as the broker")
    assert {"StatefulSet", "Deployment"} == {s["spec"]["scaleTargetRef"]["kind"] for s in scaled.values()}
    scaled_list = list(scaled.values())
    # And KEDA's webhook does refuse what it should: a second ScaledObject on the same Deployment.
    clash = {**scaled_list[0], "metadata": {**scaled_list[0]["metadata"], "name": "clash"}}
    r = cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(clash), check=False)
    assert r.returncode != 0 and "already managed by the ScaledObject" in r.stderr, r.stderr


# -- scaling on lag, live --------------------------------------------------------------------------
def scaling_experiment(**scaling) -> ExperimentConfig:
    exp = new_experiment(variants=(("a", 100),), partitions=3)
    d = exp.model_dump(mode="json")
    d["variants"][0]["scaling"] = {
        "min_replicas": 0, "max_replicas": 3, "lag_threshold": 5, "polling_interval": 2,
        "cooldown_period": 12, "scale_down_stabilization_seconds": 0, **scaling,
    }  # fmt: skip
    return ExperimentConfig.model_validate(d)


def deploy(cluster: ControlPlane, exp: ExperimentConfig, kafka_bootstrap: str, tmp_path: Path) -> str:
    """Renders the experiment for the local broker and applies its namespace, config, Deployments and
    ScaledObjects; returns the namespace."""
    ns = f"abq-{uuid.uuid4().hex[:6]}"
    render(write_config(exp, tmp_path), tmp_path, "--namespace", ns, "--bootstrap-servers", kafka_bootstrap)
    cluster.kubectl("apply", "--server-side", "--field-manager=abq", "-k", str(tmp_path / "k8s"))
    cluster.kubectl("apply", "--server-side", "--field-manager=abq", "-k", str(tmp_path / "keda"))
    return ns


def replicas(cluster: ControlPlane, ns: str, deployment: str) -> int:
    return int(cluster.get("deployment", "-n", ns, deployment)["spec"].get("replicas", 0))


def publish(settings, exp: ExperimentConfig, n: int) -> None:
    publisher = RequestPublisher(settings, exp)
    try:
        for i in range(n):
            publisher.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{uuid.uuid4().hex}", prompt=f"p{i}"))
        publisher.flush()
    finally:
        publisher.close()


def plan(exp: ExperimentConfig, kafka_bootstrap: str, tmp_path: Path) -> dict:
    r = subprocess.run(
        abq_cmd("keda", "plan", "--config", str(write_config(exp, tmp_path)), "--format", "json"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["variants"]


def external_metric(cluster: ControlPlane, ns: str, hpa: dict, i: int) -> float:
    """KEDA's value for the HPA's i-th metric, read through the API server's aggregation layer as the
    HPA controller reads it."""
    m = hpa["spec"]["metrics"][i]["external"]["metric"]
    selector = ",".join(f"{k}={v}" for k, v in m["selector"]["matchLabels"].items())
    raw = cluster.kubectl(
        "get",
        "--raw",
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{m['name']}?labelSelector={quote(selector)}",
    ).stdout
    value = json.loads(raw)["items"][0]["value"]
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_a_variant_scales_from_zero_to_n_and_back_to_zero_on_its_lag(
    cluster, settings, kafka_bootstrap, spawn_worker, tmp_path
):
    exp = scaling_experiment()
    ensure_topics(settings, exp)
    ns = deploy(cluster, exp, kafka_bootstrap, tmp_path)
    name = f"abq-{exp.name}-a"
    wait_until(
        lambda: "keda-hpa-" + name in {h["metadata"]["name"] for h in cluster.get("hpa", "-n", ns)["items"]},
        60,
        "the HPA",
    )
    assert replicas(cluster, ns, name) == 0  # no lag: KEDA keeps the variant at zero
    timings = {}

    # Activation: 3 requests, under lagThreshold 5 but above activationLagThreshold 0 -> 1 replica.
    t0 = time.monotonic()
    publish(settings, exp, 3)
    wait_until(lambda: replicas(cluster, ns, name) == 1, 60, "activation 0 -> 1")
    timings["0->1"] = time.monotonic() - t0

    # The HPA, on KEDA's external metric: 14 requests over 3 partitions / lagThreshold 5 -> 3 replicas.
    t0 = time.monotonic()
    publish(settings, exp, 11)
    wait_until(lambda: replicas(cluster, ns, name) == 3, 60, "scale up 1 -> 3")
    timings["1->3"] = time.monotonic() - t0

    # abq keda plan, at the same moment, wants what the HPA computed from the same lag.
    def agree() -> bool:
        hpa = cluster.get("hpa", "-n", ns, "keda-hpa-" + name)
        wanted = plan(exp, kafka_bootstrap, tmp_path)["a"]
        normal = next(i for i, t in enumerate(wanted["triggers"]) if t["topic"] == exp.request_topic("a"))
        # KEDA names each trigger's metric s<its index in the ScaledObject>-...
        triggers = cluster.get("scaledobject", "-n", ns, name)["spec"]["triggers"]
        at = next(i for i, t in enumerate(triggers) if t["metadata"].get("topic") == exp.request_topic("a"))
        index = next(
            i for i, m in enumerate(hpa["spec"]["metrics"]) if m["external"]["metric"]["name"].startswith(f"s{at}-")
        )
        metric = external_metric(cluster, ns, hpa, index)
        return (
            hpa["status"].get("desiredReplicas") == wanted["desired_replicas"] == 3
            and metric == wanted["triggers"][normal]["lag_metric"] == 14
        )

    wait_until(agree, 30, "abq keda plan and the HPA to agree")

    # A real worker (the same consumer group, outside the cluster) catches up: lag 0 -> 1 replica,
    # then 0 once the cooldown has passed with no lag.
    worker = spawn_worker(exp, "a")
    t0 = time.monotonic()
    wait_until(lambda: replicas(cluster, ns, name) == 1, 90, "scale down 3 -> 1 once the group caught up")
    timings["3->1"] = time.monotonic() - t0
    wait_until(lambda: replicas(cluster, ns, name) == 0, 90, "scale to zero after the cooldown")
    timings["1->0"] = time.monotonic() - t0
    worker.terminate()
    worker.wait(timeout=30)
    wanted = plan(exp, kafka_bootstrap, tmp_path)["a"]
    assert wanted["desired_replicas"] == 0 and not wanted["active"]
    print("scaling timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_a_pools_scaled_object_sums_the_lag_of_all_its_variants_topics(
    cluster, settings, kafka_bootstrap, spawn_worker, tmp_path
):
    from test_pools import pool_experiment

    exp = pool_experiment()
    d = exp.model_dump(mode="json")
    for v in d["variants"]:  # one pool, one scaling
        v["scaling"] = {
            "min_replicas": 0, "max_replicas": 3, "lag_threshold": 5, "polling_interval": 2, "cooldown_period": 12,
            "scale_down_stabilization_seconds": 0,
        }  # fmt: skip
    exp = ExperimentConfig.model_validate(d)
    ensure_topics(settings, exp)
    ns = deploy(cluster, exp, kafka_bootstrap, tmp_path)
    name = f"abq-{exp.name}-shared"

    def send(per_variant: int) -> None:
        publisher = RequestPublisher(settings, exp)
        try:
            for v in ("base", "sys", "wide"):
                for i in range(per_variant):
                    publisher.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{i}", prompt="p", variant=v))
            publisher.flush()
        finally:
            publisher.close()

    # The pool's trigger sums the lag of every topic its group has committed in: once served, each
    # variant's topic counts.
    send(1)
    worker = spawn_worker(exp, "shared")
    wait_until(
        lambda: not any(t["total_lag"] for t in plan(exp, kafka_bootstrap, tmp_path)["shared"]["triggers"]),
        60,
        "the first requests served",
    )
    worker.terminate()
    worker.wait(timeout=30)
    # 4 more on each variant's topic: alone, each wants ceil(4 / 5) = 1 replica; the pool's 12 want 3.
    send(4)
    wait_until(lambda: replicas(cluster, ns, name) == 3, 60, "the pool scaled on its summed lag")
    wanted = plan(exp, kafka_bootstrap, tmp_path)["shared"]
    per_topic = [t["replicas_wanted"] for t in wanted["triggers"] if t["topic"] and t["total_lag"]]
    assert per_topic == [1, 1, 1] and wanted["desired_replicas"] == 3
    worker = spawn_worker(exp, "shared")
    wait_until(lambda: replicas(cluster, ns, name) == 0, 90, "the pool back to zero")
    worker.terminate()
    worker.wait(timeout=30)


def test_abq_k8s_up_status_and_down(tmp_path):
    """The operator's commands: up prints the kubeconfig to use, status names each component, down stops
    them all (kube-apiserver needs a SIGKILL after its SIGTERM), nothing is left running, and the next
    up finds what the cluster held."""
    try:
        build()
    except UsageError as e:
        pytest.skip(str(e))
    d = tmp_path / "k8s"

    def abq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(abq_cmd("k8s", *args, "--dir", str(d)), capture_output=True, text=True, cwd=REPO)

    def kubectl(*args: str) -> subprocess.CompletedProcess:
        # As a user would after `eval "$(abq k8s env)"`: the exports, then kubectl from the PATH they set.
        script = f'eval "$({shlex.join(abq_cmd("k8s", "env", "--dir", str(d)))})" && kubectl {shlex.join(args)}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO)

    up = abq("up", "--hpa-sync", "5")
    assert up.returncode == 0, up.stderr
    assert 'eval "$(abq k8s env --dir' in up.stdout
    try:
        status = abq("status")
        assert status.returncode == 0 and status.stdout.count(" running (pid ") == 6, status.stdout
        assert f"export KUBECONFIG={d / 'admin.kubeconfig'}" in abq("env").stdout
        assert "Server Version: v1.36.4" in kubectl("version").stdout
        assert "Client Version: v1.36.4" in kubectl("version").stdout  # the server's own, not the machine's
        nodes = kubectl(
            "get", "apiservice", "v1beta1.external.metrics.k8s.io", "-o", "jsonpath={.status.conditions[0].status}"
        )
        assert nodes.stdout == "True", nodes.stderr  # KEDA serves external metrics through the aggregator
        assert kubectl("create", "namespace", "kept").returncode == 0
        again = abq("up")
        assert again.returncode == 2 and "already runs" in again.stderr
        assert oct((d / "pki" / "sa.key").stat().st_mode & 0o777) == "0o600"
        assert oct((d / "keda.kubeconfig").stat().st_mode & 0o777) == "0o600"  # it holds KEDA's token
        pids = json.loads((d / "state.json").read_text())["pids"]
    finally:
        down = abq("down")
    assert down.returncode == 0 and "kube-apiserver" in down.stdout
    assert not any(alive(pid) for pid in pids.values())  # gone (or a zombie init has yet to reap), not only forgotten
    after = abq("status")
    assert after.returncode == 3 and "not running" in after.stdout
    again = abq("up")
    try:
        assert again.returncode == 0, again.stderr
        assert kubectl("get", "namespace", "kept").returncode == 0  # etcd's data, the certificates: kept
    finally:
        abq("down")
