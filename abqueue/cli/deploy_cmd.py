"""`abq deploy render`: the experiment's manifests (k8s/) and ScaledObjects (keda/), validated."""

from __future__ import annotations

import argparse
from pathlib import Path

from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("deploy", help="render Kubernetes manifests and KEDA ScaledObjects for an experiment")
    dsub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    r = dsub.add_parser(
        "render",
        help="write OUT/k8s and OUT/keda (kustomize) from the experiment config",
        description="Each file is validated against the Kubernetes, KEDA, Strimzi and prometheus-operator schemas "
        "before it is written.",
    )
    r.add_argument("--config", required=True, metavar="FILE", help="experiment config YAML")
    r.add_argument("--out", type=Path, default=Path("."), help="directory to write k8s/ and keda/ into (default .)")
    r.add_argument("--namespace", default="abqueue")
    r.add_argument("--image", default="abqueue-worker:latest", help="the worker image (see Dockerfile)")
    r.add_argument(
        "--bootstrap-servers",
        required=True,
        help="the brokers as pods reach them, e.g. kafka-kafka-bootstrap.kafka:9093 (Strimzi: CLUSTER-kafka-bootstrap.NAMESPACE)",
    )
    r.add_argument("--kafka-cluster", default="kafka", help="Strimzi Kafka cluster name (strimzi.io/cluster label)")
    r.add_argument(
        "--kafka-namespace", default=None, help="namespace Strimzi's topic operator watches (default --namespace)"
    )
    r.add_argument(
        "--security-protocol", default="PLAINTEXT", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
    )
    r.add_argument("--sasl-mechanism", default=None, choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    r.add_argument("--sasl-secret", default=None, help="Secret with keys username and password")
    r.add_argument(
        "--tls-ca-secret", default=None, help="Secret with ca.crt: the CA that signed the brokers' certificates"
    )
    r.add_argument(
        "--tls-client-secret",
        default=None,
        help="Secret with tls.crt and tls.key: the client certificate for mTLS (Strimzi's KafkaUser with tls auth)",
    )
    r.add_argument(
        "--kafka-users",
        default=None,
        choices=["scram-sha-512", "tls"],
        help="also write a Strimzi KafkaUser per role (producer, worker, operator, KEDA) with only the ACLs it needs; "
        "each pod uses the Secret Strimzi makes for its user",
    )
    r.add_argument(
        "--client",
        action="append",
        default=None,
        metavar="NAME",
        help="a producer user per client (service or batch job), repeatable (default: app); it may read only its "
        "own reply topics abq.EXPERIMENT.replies.NAME.*",
    )
    r.add_argument("--models-pvc", default=None, help="PersistentVolumeClaim mounted read-only at /models")
    r.add_argument(
        "--slo-success", type=float, default=0.995, help="success-rate SLO for the burn-rate alerts (default 0.995)"
    )
    r.add_argument("--slo-p95-seconds", type=float, default=30.0, help="p95 end-to-end latency SLO (default 30)")
    r.add_argument(
        "--prometheus-server", default=None, help="add a KEDA trigger on the engine's waiting requests (Prometheus URL)"
    )
    r.add_argument(
        "--gateway-storage-pvc", default=None, metavar="CLAIM",
        help="also render abq gateway (Deployment, Service, PodDisruptionBudget, HPA), its files and batch results on "
        "this ReadWriteMany PersistentVolumeClaim",
    )  # fmt: skip
    r.add_argument(
        "--gateway-api-keys-secret", default=None, metavar="SECRET",
        help="Secret whose key api-keys.yaml maps each tenant to its API keys (without it the gateway is anonymous)",
    )  # fmt: skip
    r.add_argument("--gateway-replicas", type=int, default=2, help="the gateway's fewest replicas (default 2)")
    r.add_argument("--gateway-max-replicas", type=int, default=6, help="the gateway's most replicas (default 6)")
    r.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    from abqueue.deploy.render import GatewayTarget, Target, render, write
    from abqueue.deploy.validate import validate_files
    from schemas import load_experiment

    exp = load_experiment(args.config)
    # One rule: --kafka-users makes every pod's user and its Secret (SCRAM-SHA-512 or a certificate), so
    # it takes no --sasl-secret and at most the mechanism it uses; without it, a mechanism needs a Secret.
    # (It demanded --sasl-secret with --kafka-users, and then refused it.)
    if args.kafka_users == "scram-sha-512" and args.sasl_mechanism and args.sasl_mechanism.upper() != "SCRAM-SHA-512":
        raise UsageError(
            f"--kafka-users scram-sha-512 makes SCRAM-SHA-512 users; drop --sasl-mechanism {args.sasl_mechanism}"
        )
    if args.kafka_users == "tls" and args.sasl_mechanism:
        raise UsageError("--kafka-users tls authenticates each pod by its certificate; drop --sasl-mechanism")
    if args.sasl_mechanism and not args.sasl_secret and not args.kafka_users:
        raise UsageError(
            "--sasl-mechanism needs --sasl-secret (a Secret with username and password), or --kafka-users scram-sha-512"
        )
    if args.sasl_secret and not args.security_protocol.startswith("SASL"):
        raise UsageError(
            f"--sasl-secret needs --security-protocol SASL_PLAINTEXT or SASL_SSL, not {args.security_protocol}"
        )
    if args.tls_client_secret and args.security_protocol not in ("SSL", "SASL_SSL"):
        raise UsageError(f"--tls-client-secret needs --security-protocol SSL or SASL_SSL, not {args.security_protocol}")
    if args.kafka_users and (args.sasl_secret or args.tls_client_secret):
        raise UsageError("--kafka-users gives every pod its own user's Secret; drop --sasl-secret/--tls-client-secret")
    if args.kafka_users == "scram-sha-512" and not args.security_protocol.startswith("SASL"):
        raise UsageError(
            f"--kafka-users scram-sha-512 needs --security-protocol SASL_SSL or SASL_PLAINTEXT, not {args.security_protocol}"
        )
    if args.kafka_users == "tls" and args.security_protocol != "SSL":
        raise UsageError(f"--kafka-users tls needs --security-protocol SSL, not {args.security_protocol}")
    if args.client and not args.kafka_users:
        raise UsageError("--client names producer users; it needs --kafka-users scram-sha-512 or tls")
    if args.gateway_api_keys_secret and not args.gateway_storage_pvc:
        raise UsageError("--gateway-api-keys-secret is for the gateway; render it with --gateway-storage-pvc CLAIM")
    if not 1 <= args.gateway_replicas <= args.gateway_max_replicas:
        raise UsageError("--gateway-replicas must be at least 1 and at most --gateway-max-replicas")
    if not 0 < args.slo_success < 1:
        raise UsageError("--slo-success must be between 0 and 1, e.g. 0.995")
    target = Target(
        namespace=args.namespace,
        image=args.image,
        bootstrap_servers=args.bootstrap_servers,
        kafka_cluster=args.kafka_cluster,
        kafka_namespace=args.kafka_namespace,
        security_protocol=args.security_protocol,
        sasl_mechanism=args.sasl_mechanism,
        sasl_secret=args.sasl_secret,
        tls_ca_secret=args.tls_ca_secret,
        tls_client_secret=args.tls_client_secret,
        models_pvc=args.models_pvc,
        slo_success=args.slo_success,
        slo_p95_seconds=args.slo_p95_seconds,
        prometheus_server=args.prometheus_server,
        kafka_users=args.kafka_users,
        clients=args.client or ["app"],
        gateway=(
            GatewayTarget(
                args.gateway_storage_pvc, args.gateway_api_keys_secret, args.gateway_replicas, args.gateway_max_replicas
            )
            if args.gateway_storage_pvc
            else None
        ),
    )
    files = render(exp, target)
    n = validate_files(files)
    written = write(files, args.out)
    print(
        f"{n} resources for experiment {exp.name} validated; wrote {len(written)} files under {args.out}/k8s and {args.out}/keda"
    )
    print(f"apply: kubectl apply -k {args.out}/k8s && kubectl apply -k {args.out}/keda")
    return 0
