"""`abq deploy render`: an experiment's Kubernetes manifests (k8s/) and KEDA ScaledObjects (keda/),
from its config, so nothing is hand-edited per variant. Names, topics and groups come from the one
naming rule in schemas/experiment.py."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import yaml

from abqueue.deploy.dashboard import dashboard
from abqueue.kafka import acls
from abqueue.kafka.replication import resolve as resolve_replication
from abqueue.kafka.topics import CANCEL_RETENTION_MS
from abqueue.scaling.plan import trigger_metadata
from schemas import ExperimentConfig

METRICS_PORT = 9400
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
CONFIG_DIR = "/etc/abqueue"
# Every pod runs as the image's non-root user (uid 10001, see Dockerfile) with nothing to escalate to.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
TLS_DIR = "/etc/abqueue/tls"


@dataclass
class Target:
    """Where and how the experiment runs; `abq deploy render` flags."""

    namespace: str = "abqueue"
    image: str = "abqueue-worker:latest"
    bootstrap_servers: str = "kafka-kafka-bootstrap.kafka:9092"
    kafka_cluster: str = "kafka"  # Strimzi's strimzi.io/cluster label
    kafka_namespace: str | None = None  # where Strimzi watches KafkaTopics (default: the namespace)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_secret: str | None = None  # keys: username, password
    tls_ca_secret: str | None = None  # key ca.crt: the CA the brokers' certificates are checked against
    tls_client_secret: str | None = None  # keys tls.crt + tls.key: the client certificate, for mTLS
    models_pvc: str | None = None  # mounted read-only at /models
    slo_success: float = 0.995
    slo_p95_seconds: float = 30.0
    prometheus_server: str | None = None  # adds a trigger on the engine's waiting requests
    extra_labels: dict[str, str] = field(default_factory=dict)
    # A Strimzi KafkaUser per role (scram-sha-512 or tls) with only the ACLs the role needs; each
    # pod then uses the Secret Strimzi makes for its own user instead of sasl_secret/tls_client_secret.
    kafka_users: str | None = None
    clients: list[str] = field(default_factory=lambda: ["app"])  # producer users, one per client
    gateway: GatewayTarget | None = None  # also render `abq gateway`'s Deployment, Service, PDB and HPA


GATEWAY_PORT = 8000
GATEWAY_STORAGE = "/var/lib/abqueue/gateway"


@dataclass
class GatewayTarget:
    """`abq deploy render --gateway` flags."""

    storage_pvc: str  # a ReadWriteMany claim every replica mounts: files and batch results
    api_keys_secret: str | None = None  # key api-keys.yaml: tenant -> keys; None: anonymous
    min_replicas: int = 2
    max_replicas: int = 6


def _user_secret_env(t: Target, user: str) -> list[dict]:
    """Credentials from the Secret Strimzi makes for `user` (named as the user; a SCRAM one holds
    `password` and `sasl.jaas.config`, no username: the user name is the KafkaUser's name)."""
    if t.kafka_users == "tls":
        return [
            {"name": "ABQ_SSL_CERTFILE", "value": f"{TLS_DIR}/client/user.crt"},
            {"name": "ABQ_SSL_KEYFILE", "value": f"{TLS_DIR}/client/user.key"},
        ]
    return [
        {"name": "ABQ_SASL_MECHANISM", "value": "SCRAM-SHA-512"},
        {"name": "ABQ_SASL_USERNAME", "value": user},
        {"name": "ABQ_SASL_PASSWORD", "valueFrom": {"secretKeyRef": {"name": user, "key": "password"}}},
    ]


def _name(*parts: str) -> str:
    """A Kubernetes object name (DNS-1123) from our names, which may hold underscores."""
    return re.sub(r"[^a-z0-9-]", "-", "-".join(("abq",) + parts).lower())[:63].strip("-")


def _labels(exp: ExperimentConfig, variant: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "abqueue-worker",
        "app.kubernetes.io/part-of": "abqueue",
        "abqueue.io/experiment": exp.name,
    }
    if variant:
        out["abqueue.io/variant"] = variant
    return out


def _config_yaml(exp: ExperimentConfig) -> str:
    return yaml.safe_dump(exp.model_dump(mode="json", exclude_defaults=False), sort_keys=False)


def _kafka_env(t: Target, user: str | None = None) -> list[dict]:
    env: list[dict] = [
        {"name": "ABQ_BOOTSTRAP_SERVERS", "value": t.bootstrap_servers},
        {"name": "ABQ_SECURITY_PROTOCOL", "value": t.security_protocol},
    ]
    if t.tls_ca_secret:
        env.append({"name": "ABQ_SSL_CAFILE", "value": f"{TLS_DIR}/ca/ca.crt"})
    if t.kafka_users and user:
        return env + _user_secret_env(t, user)
    if t.sasl_secret:
        env += [
            {"name": "ABQ_SASL_MECHANISM", "value": t.sasl_mechanism or "SCRAM-SHA-512"},
            {"name": "ABQ_SASL_USERNAME", "valueFrom": {"secretKeyRef": {"name": t.sasl_secret, "key": "username"}}},
            {"name": "ABQ_SASL_PASSWORD", "valueFrom": {"secretKeyRef": {"name": t.sasl_secret, "key": "password"}}},
        ]
    if t.tls_client_secret:
        env += [
            {"name": "ABQ_SSL_CERTFILE", "value": f"{TLS_DIR}/client/tls.crt"},
            {"name": "ABQ_SSL_KEYFILE", "value": f"{TLS_DIR}/client/tls.key"},
        ]
    return env


def workload_kind(v) -> str:
    return "StatefulSet" if v.deploy.delivery == "exactly-once" else "Deployment"


def deployment(exp: ExperimentConfig, variant: str, t: Target) -> dict:
    """The workers of a variant, or of a pool (`variant` names either)."""
    v = exp.serving(variant)[0]
    d, sc = v.deploy, v.scaling
    labels = _labels(exp, variant)
    # The worker drains for as long as the pod's grace period allows (drain_seconds + 30 for the rest).
    # --follow: the live config's limits, system prompts and sampling reach deployed workers too.
    args = ["--config", f"{CONFIG_DIR}/experiment.yaml", "--variant", variant, "--drain-seconds", str(sc.drain_seconds),
            "--follow"]  # fmt: skip
    if d.max_inflight:
        args += ["--max-inflight", str(d.max_inflight)]
    user = acls.user_name(exp, "worker", variant)
    env = _kafka_env(t, user) + [{"name": "ABQ_LOG_LEVEL", "value": "INFO"}]
    if d.delivery == "exactly-once":
        # The transactional id is "<group>.<worker id>": a StatefulSet pod's name is its slot
        # (name-0, name-1, ...), the same for its replacement, whose first transaction then fences
        # the old pod's open one instead of leaving read_committed readers stalled until it times out.
        args += ["--delivery", "exactly-once", "--worker-id", "$(POD_NAME)"]
        env.insert(0, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    requests = {"cpu": d.cpu, "memory": d.memory}
    limits = {"memory": d.memory}
    if d.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(d.gpus)
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "config", "configMap": {"name": _name(exp.name, "config")}},
        # vLLM's workers share tensors through /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    client_secret = user if t.kafka_users == "tls" else t.tls_client_secret
    for part, secret in (("ca", t.tls_ca_secret), ("client", client_secret)):
        if secret:
            mounts.append({"name": f"kafka-tls-{part}", "mountPath": f"{TLS_DIR}/{part}", "readOnly": True})
            volumes.append({"name": f"kafka-tls-{part}", "secret": {"secretName": secret}})
    if t.models_pvc:
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": t.models_pvc, "readOnly": True}})
    probe = {"httpGet": {"path": "/healthz", "port": "metrics"}}
    if d.delivery == "exactly-once":
        # Parallel: KEDA scales slots up and down together, not one at a time in order.
        rollout = {"serviceName": _name(exp.name, variant), "podManagementPolicy": "Parallel",
                   "updateStrategy": {"type": "RollingUpdate"}}  # fmt: skip
    else:
        rollout = {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}
    return {
        "apiVersion": "apps/v1",
        "kind": workload_kind(v),
        "metadata": {
            "name": _name(exp.name, variant),
            "namespace": t.namespace,
            "labels": {**labels, **t.extra_labels},
        },
        "spec": {
            "replicas": sc.min_replicas,  # KEDA owns the count from here
            "selector": {"matchLabels": labels},
            **rollout,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "abqueue.io/config-sha256": hashlib.sha256(_config_yaml(exp).encode()).hexdigest()[:16],
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    # SIGTERM makes the worker finish its in-flight requests, publish and commit;
                    # the grace period must cover that, or the kubelet kills it halfway.
                    "terminationGracePeriodSeconds": sc.drain_seconds + 30,
                    "securityContext": POD_SECURITY,
                    "nodeSelector": d.node_selector,
                    "tolerations": d.tolerations,
                    "containers": [
                        {
                            "name": "worker",
                            "image": t.image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": args,
                            "env": env,
                            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                            # Model loading and warm-up can take minutes: liveness waits for startup.
                            "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 90},
                            "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "metrics"},
                                "periodSeconds": 5,
                                "timeoutSeconds": 3,
                            },
                            # Drain inside preStop: signal the worker, wait until it has exited cleanly.
                            "lifecycle": {
                                "preStop": {
                                    "exec": {
                                        "command": [
                                            "/bin/sh",
                                            "-c",
                                            "kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done",
                                        ]
                                    }
                                }
                            },
                            "resources": {"requests": requests, "limits": limits},
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def gateway_manifests(exp: ExperimentConfig, t: Target, g: GatewayTarget) -> list[dict]:
    """The gateway: a Deployment (each pod its own instance, so its own reply topic), a Service, a
    PodDisruptionBudget and a CPU HorizontalPodAutoscaler (its work is HTTP and JSON, not lag)."""
    name = _name(exp.name, "gateway")
    labels = {**_labels(exp), "app.kubernetes.io/name": "abqueue-gateway"}
    args = ["gateway", "--config", f"{CONFIG_DIR}/experiment.yaml", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--storage", GATEWAY_STORAGE, "--instance", "$(POD_NAME)"]  # fmt: skip
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "storage", "mountPath": GATEWAY_STORAGE},
    ]
    volumes: list[dict] = [
        {"name": "config", "configMap": {"name": _name(exp.name, "config")}},
        {"name": "storage", "persistentVolumeClaim": {"claimName": g.storage_pvc}},
    ]
    if g.api_keys_secret:
        args += ["--api-keys", "/etc/abqueue-gateway/api-keys.yaml"]
        mounts.append({"name": "api-keys", "mountPath": "/etc/abqueue-gateway", "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": g.api_keys_secret, "defaultMode": 0o400}})
    else:
        args.append("--allow-anonymous")
    user = acls.user_name(exp, "gateway")
    client_secret = user if t.kafka_users == "tls" else t.tls_client_secret
    for part, secret in (("ca", t.tls_ca_secret), ("client", client_secret)):
        if secret:
            mounts.append({"name": f"kafka-tls-{part}", "mountPath": f"{TLS_DIR}/{part}", "readOnly": True})
            volumes.append({"name": f"kafka-tls-{part}", "secret": {"secretName": secret}})
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, *_kafka_env(t, user),
           {"name": "ABQ_LOG_LEVEL", "value": "INFO"}]  # fmt: skip
    probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    meta = {"namespace": t.namespace, "labels": {**labels, **t.extra_labels}}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, **meta},
            "spec": {
                "replicas": g.min_replicas,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "abqueue.io/config-sha256": hashlib.sha256(_config_yaml(exp).encode()).hexdigest()[:16]
                        },
                    },
                    "spec": {
                        # A batch's runner stops at once and its next owner resumes it; a caller still
                        # waiting gets its answer within the request timeout.
                        "terminationGracePeriodSeconds": 70,
                        "securityContext": POD_SECURITY,
                        "containers": [
                            {
                                "name": "gateway",
                                "image": t.image,
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["abq"],
                                "args": args,
                                "env": env,
                                "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
                                "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 5},
                                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                                "securityContext": CONTAINER_SECURITY,
                                "volumeMounts": mounts,
                            }
                        ],
                        "volumes": volumes,
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, **meta},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": t.namespace},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, **meta},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": g.min_replicas,
                "maxReplicas": g.max_replicas,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                    }
                ],  # fmt: skip
            },
        },
    ]


def scaled_object(exp: ExperimentConfig, variant: str, t: Target) -> dict:
    """A variant's (or a pool's) ScaledObject: a Kafka trigger per request topic, which wakes the
    workers from zero even before the group has committed anything there; for a pool also one over
    every topic its group has committed offsets in (no `topic`: KEDA sums them), so that the pool
    scales on its total lag, not on its busiest topic's. The HPA follows the largest."""
    served = exp.serving(variant)
    sc = served[0].scaling
    secured = t.sasl_secret or t.tls_ca_secret or t.tls_client_secret or t.kafka_users
    auth = {"authenticationRef": {"name": _name(exp.name, "kafka-auth")}} if secured else {}
    triggers = []
    pooled = len(served) > 1 or served[0].pool is not None
    topics = [
        (f"{v.name}-{level}" if pooled else level, topic)
        for v in served
        for level, topic in exp.request_topics(v.name).items()
    ]
    for name, topic in [*topics, *([("pool", None)] if pooled else [])]:
        meta = {
            k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in trigger_metadata(exp, variant, topic).items()
        }
        meta["bootstrapServers"] = t.bootstrap_servers
        if t.kafka_users == "scram-sha-512":
            meta["sasl"] = KEDA_SASL["SCRAM-SHA-512"]
        elif t.sasl_secret:
            meta["sasl"] = KEDA_SASL[(t.sasl_mechanism or "SCRAM-SHA-512").upper()]
        if (
            t.tls_ca_secret
            or t.tls_client_secret
            or t.kafka_users == "tls"
            or t.security_protocol in ("SSL", "SASL_SSL")
        ):
            meta["tls"] = "enable"
        triggers.append({"type": "kafka", "name": f"lag-{name}", "metadata": meta, **auth})
    if t.prometheus_server:
        triggers.append(
            {
                "type": "prometheus",
                "name": "engine-waiting",
                "metadata": {
                    "serverAddress": t.prometheus_server,
                    "query": f'sum(abq_engine_waiting_requests{{experiment="{exp.name}",variant="{variant}"}})',
                    "threshold": str(sc.lag_threshold),
                    "activationThreshold": "0",
                },
            }
        )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": _name(exp.name, variant), "namespace": t.namespace, "labels": _labels(exp, variant)},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": workload_kind(served[0]),
                "name": _name(exp.name, variant),
            },  # fmt: skip
            "pollingInterval": sc.polling_interval,
            "cooldownPeriod": sc.cooldown_period,
            "minReplicaCount": sc.min_replicas,
            "maxReplicaCount": sc.max_replicas,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        # One pod at a time, no faster than a worker drains: scale-in never outruns a batch.
                        "scaleDown": {
                            "stabilizationWindowSeconds": sc.scale_down_stabilization_seconds,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": min(1800, sc.drain_seconds)}],
                        },
                        "scaleUp": {
                            "stabilizationWindowSeconds": 0,
                            "policies": [
                                {"type": "Percent", "value": 100, "periodSeconds": 15},
                                {"type": "Pods", "value": 4, "periodSeconds": 15},
                            ],
                            "selectPolicy": "Max",
                        },
                    }
                }
            },
            "triggers": triggers,
        },
    }


def trigger_authentication(exp: ExperimentConfig, t: Target) -> dict | None:
    refs = []
    from_config_maps = []
    keda_user = acls.user_name(exp, "keda")
    if t.kafka_users == "scram-sha-512":
        # Strimzi's Secret has no username key; the user name comes from the users ConfigMap.
        refs.append({"parameter": "password", "name": keda_user, "key": "password"})
        from_config_maps.append({"parameter": "username", "name": _name(exp.name, "kafka-users"), "key": "keda"})
    elif t.kafka_users == "tls":
        refs += [
            {"parameter": "cert", "name": keda_user, "key": "user.crt"},
            {"parameter": "key", "name": keda_user, "key": "user.key"},
        ]
    elif t.sasl_secret:
        refs += [
            {"parameter": "username", "name": t.sasl_secret, "key": "username"},
            {"parameter": "password", "name": t.sasl_secret, "key": "password"},
        ]
    if t.tls_ca_secret:
        refs.append({"parameter": "ca", "name": t.tls_ca_secret, "key": "ca.crt"})
    if t.tls_client_secret and not t.kafka_users:
        refs += [
            {"parameter": "cert", "name": t.tls_client_secret, "key": "tls.crt"},
            {"parameter": "key", "name": t.tls_client_secret, "key": "tls.key"},
        ]
    if not refs:
        return None
    spec: dict = {"secretTargetRef": refs}
    if from_config_maps:
        spec["configMapTargetRef"] = from_config_maps
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": _name(exp.name, "kafka-auth"), "namespace": t.namespace},
        "spec": spec,
    }


def kafka_users(exp: ExperimentConfig, t: Target) -> list[dict]:
    """One Strimzi KafkaUser per role, each allowed only what its role needs (abqueue.kafka.acls);
    Strimzi makes a Secret of the same name with the user's password or certificate."""
    return [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaUser",
            "metadata": {
                "name": p.user,
                "namespace": t.kafka_namespace or t.namespace,
                "labels": {"strimzi.io/cluster": t.kafka_cluster, "abqueue.io/role": p.role, **_labels(exp)},
            },
            "spec": {
                "authentication": {"type": t.kafka_users},
                "authorization": {"type": "simple", "acls": [g.strimzi() for g in p.grants]},
            },
        }
        for p in acls.principals(exp, t.clients)
    ]


def kafka_topics(exp: ExperimentConfig, t: Target) -> list[dict]:
    # A Strimzi cluster is a production one: unset replication means three copies, two in sync.
    want = resolve_replication(exp.replication_factor, exp.min_insync_replicas, brokers=None)

    def topic(name: str, partitions: int, retention_ms: int) -> dict:
        return {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {
                "name": re.sub(r"[^a-z0-9-]", "-", name),
                "namespace": t.kafka_namespace or t.namespace,
                "labels": {"strimzi.io/cluster": t.kafka_cluster, **_labels(exp)},
            },
            "spec": {
                "topicName": name,
                "partitions": partitions,
                "replicas": want.factor,
                "config": {"retention.ms": retention_ms, "min.insync.replicas": want.min_insync},
            },
        }

    week = 7 * 24 * 3600 * 1000
    out = [
        topic(name, exp.partitions_for(v.name), week)
        for v in exp.variants
        for name in exp.request_topics(v.name).values()
    ]
    out.append(topic(exp.response_topic, exp.partitions, week))
    out.append(topic(exp.deadletter_topic, 1, 4 * week))
    out.append(topic(exp.cancel_topic, 1, CANCEL_RETENTION_MS))
    return out


def prometheus_rule(exp: ExperimentConfig, t: Target) -> dict:
    sel = f'experiment="{exp.name}"'
    budget = 1 - t.slo_success
    by = "by (experiment, variant)"

    def errors(w: str) -> str:
        return (
            f'(sum(rate(abq_requests_total{{{sel},outcome=~"error|expired"}}[{w}])) {by} '
            f"/ sum(rate(abq_requests_total{{{sel}}}[{w}])) {by})"
        )

    def p95(w: str) -> str:
        return f"histogram_quantile(0.95, sum(rate(abq_end_to_end_seconds_bucket{{{sel}}}[{w}])) by (le, experiment, variant))"

    rules = [
        # Multi-window burn rates (the SRE workbook): page on a 2% budget burn in an hour, ticket on 5% in 6 hours.
        {
            "alert": "AbqErrorBudgetFastBurn",
            "expr": f"{errors('1h')} > {14.4 * budget:.6g} and {errors('5m')} > {14.4 * budget:.6g}",
            "for": "2m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": "Variant {{ $labels.variant }} of {{ $labels.experiment }} is burning its error budget 14x too fast"
            },
        },
        {
            "alert": "AbqErrorBudgetSlowBurn",
            "expr": f"{errors('6h')} > {6 * budget:.6g} and {errors('30m')} > {6 * budget:.6g}",
            "for": "15m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "Variant {{ $labels.variant }} of {{ $labels.experiment }} is burning its error budget 6x too fast"
            },
        },
        {
            "alert": "AbqLatencyP95High",
            "expr": f"{p95('1h')} > {t.slo_p95_seconds:g} and {p95('5m')} > {t.slo_p95_seconds:g}",
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": f"p95 end-to-end latency of {{{{ $labels.variant }}}} above {t.slo_p95_seconds:g}s for an hour and now"
            },
        },
        {
            "alert": "AbqDeadLettersGrowing",
            "expr": f"sum(increase(abq_dead_letters_total{{{sel}}}[15m])) by (experiment, variant, reason) > 0",
            "for": "15m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "Requests of {{ $labels.variant }} go to the dead-letter topic ({{ $labels.reason }})"
            },
        },
        {
            "alert": "AbqWorkerRejoinedItsGroup",
            # A gauge that only grows while the worker lives: changes(), not increase().
            "expr": f"sum(changes(abq_group_rejoins{{{sel}}}[1h])) by (experiment, variant) > 0",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "A worker of {{ $labels.variant }} was left holding no partitions while some had no owner, "
                "and joined its group again (its log says when)"
            },
        },
    ]
    for v in exp.variants:
        so, hpa, group = _name(exp.name, v.name), f"keda-hpa-{_name(exp.name, v.name)}", exp.consumer_group(v.name)
        rules.append(
            {
                "alert": "AbqLagGrowingAtMaxReplicas",
                "expr": (
                    f'sum(deriv(keda_scaler_metrics_value{{scaledObject="{so}"}}[10m])) > 0 and on() '
                    f'kube_horizontalpodautoscaler_status_current_replicas{{horizontalpodautoscaler="{hpa}"}} '
                    f'>= on() kube_horizontalpodautoscaler_spec_max_replicas{{horizontalpodautoscaler="{hpa}"}}'
                ),
                "for": "15m",
                "labels": {"severity": "page", "variant": v.name},
                "annotations": {
                    "summary": f"Lag of {v.name} keeps growing at its maximum of {v.scaling.max_replicas} replicas; "
                    "raise maxReplicas (and partitions) or add GPUs"
                },
            }
        )
        rules.append(
            {
                "alert": "AbqConsumerGroupEmptyWithLag",
                "expr": (
                    f'sum(kafka_consumergroup_lag{{consumergroup="{group}"}}) > 0 and on() '
                    f'(sum(kafka_consumergroup_members{{consumergroup="{group}"}}) or on() vector(0)) == 0'
                ),
                "for": "10m",
                "labels": {"severity": "page", "variant": v.name},
                "annotations": {
                    "summary": f"{group} has lag but no members: KEDA is not waking {v.name}, or its pods cannot start"
                },
            }
        )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": _name(exp.name, "slo"), "namespace": t.namespace, "labels": _labels(exp)},
        "spec": {"groups": [{"name": f"abqueue-{exp.name}", "rules": rules}]},
    }


def render(exp: ExperimentConfig, t: Target) -> dict[str, list[dict]]:
    """File name (under k8s/ or keda/) -> documents."""
    labels = _labels(exp)
    k8s: dict[str, list[dict]] = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": t.namespace}}],
        "configmap.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": _name(exp.name, "config"), "namespace": t.namespace, "labels": labels},
                "data": {"experiment.yaml": _config_yaml(exp)},
            }
        ],
        "service.yaml": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": _name(exp.name, "metrics"), "namespace": t.namespace, "labels": labels},
                "spec": {
                    "clusterIP": "None",
                    "selector": labels,
                    "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
                },
            }
        ],
        "servicemonitor.yaml": [
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "ServiceMonitor",
                "metadata": {"name": _name(exp.name), "namespace": t.namespace, "labels": labels},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
                },
            }
        ],
        "kafkatopics.yaml": kafka_topics(exp, t),
        **(
            {
                "kafkausers.yaml": kafka_users(exp, t),
                # Who is who, for KEDA's TriggerAuthentication (the username is not in Strimzi's Secret)
                # and for people: role -> Kafka user name. No secret in it.
                "kafka-users-configmap.yaml": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": _name(exp.name, "kafka-users"),
                            "namespace": t.namespace,
                            "labels": labels,
                        },
                        "data": {p.key: p.user for p in acls.principals(exp, t.clients)},
                    }
                ],
            }
            if t.kafka_users
            else {}
        ),
        "prometheusrule.yaml": [prometheus_rule(exp, t)],
        # Grafana's dashboard sidecar loads ConfigMaps with this label; the JSON is also written on
        # its own (grafana-dashboard.json) for importing by hand.
        "grafana-dashboard.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": _name(exp.name, "dashboard"),
                    "namespace": t.namespace,
                    "labels": {**labels, "grafana_dashboard": "1"},
                },
                "data": {
                    f"abqueue-{exp.name}.json": orjson.dumps(dashboard(exp.name), option=orjson.OPT_INDENT_2).decode()
                },
            }
        ],
    }
    for unit in exp.serving_units():  # a pool's variants share its workers
        k8s[f"deployment-{unit}.yaml"] = [deployment(exp, unit, t)]
        k8s[f"pdb-{unit}.yaml"] = [
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": _name(exp.name, unit), "namespace": t.namespace},
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(exp, unit)}},
            }
        ]
    if t.gateway is not None:
        k8s["gateway.yaml"] = gateway_manifests(exp, t, t.gateway)
    keda = {f"scaledobject-{u}.yaml": [scaled_object(exp, u, t)] for u in exp.serving_units()}
    auth = trigger_authentication(exp, t)
    if auth:
        keda["triggerauthentication.yaml"] = [auth]
    return {**{f"k8s/{k}": docs for k, docs in k8s.items()}, **{f"keda/{k}": docs for k, docs in keda.items()}}


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a shared dict is written out twice, not as &id001
        return True


def write(files: dict[str, list[dict]], out: Path) -> list[Path]:
    written = []
    for sub in ("k8s", "keda"):
        names = sorted(k.split("/", 1)[1] for k in files if k.startswith(sub + "/"))
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": names}
        (out / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            path = out / sub / name
            path.write_text(
                "# Rendered by `abq deploy render`; edit the experiment config, not this file.\n"
                + yaml.dump_all(files[f"{sub}/{name}"], Dumper=_NoAliases, sort_keys=False)
            )
            written.append(path)
        path = out / sub / "kustomization.yaml"
        path.write_text(yaml.dump(kustomization, Dumper=_NoAliases, sort_keys=False))
        written.append(path)
        if sub == "k8s":
            board = next(d for d in files["k8s/grafana-dashboard.yaml"])["data"]
            path = out / sub / "grafana-dashboard.json"
            path.write_text(next(iter(board.values())) + "\n")
            written.append(path)
    return written
