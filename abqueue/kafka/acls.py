"""The Kafka ACLs each abqueue role needs, and nothing more: one source for the Strimzi KafkaUsers
that `abq deploy render` writes and for the ACLs `abq kafka acl` creates on a broker.

Operations are named as Strimzi names them (Read, Write, Describe...). Describe is what lets a client
see that a topic exists at all: a role without it on a topic gets TOPIC_AUTHORIZATION_FAILED whether
or not the topic exists, so it learns nothing about other callers' topics."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from schemas.experiment import TOPIC_PREFIX, ConfigError, ExperimentConfig

ROLES = ("producer", "worker", "operator", "keda", "gateway")
CONFIG_TOPIC = f"{TOPIC_PREFIX}.experiments"  # abqueue.control.live_config.CONFIG_TOPIC
ROLLOUT_TOPIC = f"{TOPIC_PREFIX}.rollouts"  # abqueue.control.rollout.ROLLOUT_TOPIC


@dataclass(frozen=True)
class Grant:
    resource: str  # topic | group | transactionalId | cluster
    name: str
    pattern: str  # literal | prefix
    operations: tuple[str, ...]

    def strimzi(self) -> dict:
        resource = {"type": self.resource}
        if self.resource != "cluster":
            resource |= {"name": self.name, "patternType": self.pattern}
        return {"type": "allow", "resource": resource, "operations": list(self.operations), "host": "*"}


def _topic(name: str, *ops: str, prefix: bool = False) -> Grant:
    return Grant("topic", name, "prefix" if prefix else "literal", ops)


def reply_prefix(exp: ExperimentConfig, client: str) -> str:
    """The reply topics one producer owns: abq.<experiment>.replies.<client>.*"""
    return f"{TOPIC_PREFIX}.{exp.name}.replies.{client}."


def _reply_grants(exp: ExperimentConfig, *ops: str) -> list[Grant]:
    out = []
    for pattern in exp.reply_topic_patterns:
        head, star, tail = pattern.partition("*")
        if any(c in head for c in "?[") or tail:
            raise ConfigError(
                f"reply_topics pattern {pattern!r} cannot be a Kafka ACL: use a literal topic name or a prefix ending in *"
            )
        out.append(_topic(head, *ops, prefix=bool(star)))
    return out


def producer(exp: ExperimentConfig, client: str) -> list[Grant]:
    """A service or batch job: publish requests and feedback, follow the live config, read its own replies."""
    return [
        *(
            _topic(t, "Write", "Describe", "DescribeConfigs")
            for v in exp.variants
            if v.shadow_of is None
            for t in exp.request_topics(v.name).values()
        ),
        _topic(exp.feedback_topic, "Write", "Describe", "DescribeConfigs"),
        _topic(exp.cancel_topic, "Write", "Describe"),  # cancels of its own requests: workers check the tag
        _topic(CONFIG_TOPIC, "Read", "Describe"),
        _topic(reply_prefix(exp, client), "Read", "Describe", "DescribeConfigs", "Create", prefix=True),
    ]


def worker(exp: ExperimentConfig, variant: str) -> list[Grant]:
    """One variant's workers (or a pool's): consume its requests in its group, answer, dead-letter, in
    transactions."""
    served = exp.serving(variant)
    group = exp.consumer_group(variant)
    answers = exp.shadow_response_topic if served[0].shadow_of else exp.response_topic
    return [
        *(
            _topic(t, "Read", "Describe", "DescribeConfigs")
            for v in served
            for t in exp.request_topics(v.name).values()
        ),
        Grant("group", group, "literal", ("Read", "Describe")),
        _topic(answers, "Write", "Describe", "DescribeConfigs"),
        _topic(exp.deadletter_topic, "Write", "Describe", "DescribeConfigs"),
        *_reply_grants(exp, "Write", "Describe", "DescribeConfigs"),
        Grant("transactionalId", f"{group}.", "prefix", ("Write", "Describe")),
        _topic(CONFIG_TOPIC, "Read", "Describe"),
        _topic(exp.cancel_topic, "Read", "Describe"),  # without a group: every worker reads every cancel
    ]


def operator(exp: ExperimentConfig) -> list[Grant]:
    """Whoever runs the experiment: creates its topics, publishes configs and rollouts, reads the
    answers for reports and guardrails, reads the groups' lag for `abq keda plan`."""
    return [
        _topic(f"{TOPIC_PREFIX}.{exp.name}.", "Create", "Describe", "DescribeConfigs", "AlterConfigs", prefix=True),
        *(
            _topic(t, "Read")
            for t in (exp.response_topic, exp.shadow_response_topic, exp.deadletter_topic, exp.feedback_topic)
        ),
        *(_topic(t, "Read", "Write", "Create", "Describe", "DescribeConfigs") for t in (CONFIG_TOPIC, ROLLOUT_TOPIC)),
        Grant("group", f"{TOPIC_PREFIX}.{exp.name}.", "prefix", ("Describe", "Read")),
        Grant("cluster", "kafka-cluster", "literal", ("Describe",)),  # listing the groups
    ]


GATEWAY_CLIENT = "gateway"  # the gateway's reply topics are a producer's: abq.<experiment>.replies.gateway.*
GATEWAY_TOPICS = f"{TOPIC_PREFIX}._gateway."  # abqueue.gateway.records: files and batches
GATEWAY_GROUP = f"{TOPIC_PREFIX}._gateway.batch-runners"  # abqueue.gateway.batches.GROUP


def gateway(exp: ExperimentConfig) -> list[Grant]:
    """`abq gateway`: a producer whose client is `gateway`, plus its files and batches records, the
    batch runners' group, and the workers' groups' offsets (the backlog it sheds load on)."""
    return [
        *producer(exp, GATEWAY_CLIENT),
        _topic(GATEWAY_TOPICS, "Read", "Write", "Create", "Describe", "DescribeConfigs", prefix=True),
        Grant("group", GATEWAY_GROUP, "literal", ("Read", "Describe")),
        *(Grant("group", exp.consumer_group(u), "literal", ("Describe",)) for u in exp.serving_units()),
    ]


def keda(exp: ExperimentConfig) -> list[Grant]:
    """KEDA's Kafka scaler: topic metadata and end offsets, the groups' committed offsets."""
    return [
        *(_topic(t, "Describe") for v in exp.variants for t in exp.request_topics(v.name).values()),
        *(Grant("group", exp.consumer_group(u), "literal", ("Describe",)) for u in exp.serving_units()),
    ]


CLIENT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass(frozen=True)
class Principal:
    role: str
    key: str  # role, or role-name for the roles with one user per client or variant
    user: str  # the Kafka user (and KafkaUser, and its Secret) name
    grants: tuple[Grant, ...]


RESERVED_CLIENTS = {GATEWAY_CLIENT: "the gateway's reply topics are abq.<experiment>.replies.gateway.*"}
_DNS_1123 = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def user_name(exp: ExperimentConfig, role: str, name: str | None = None) -> str:
    """A Kafka user name that is also a Kubernetes name (DNS-1123), as Strimzi needs, and one per
    principal: where the plain name is not a DNS-1123 name as it stands (an '_', over 63
    characters), it is cut and ends in a hash of the exact experiment, role and name, so that
    `gpu_a` and `gpu-a`, or two clients cut to the same 63 characters, never share a user."""
    plain = "-".join(["abq", exp.name, role, *([name] if name else [])])
    if _DNS_1123.fullmatch(plain):
        return plain
    digest = hashlib.sha256("\x00".join([exp.name, role, name or ""]).encode()).hexdigest()[:8]
    cut = re.sub(r"[^a-z0-9-]", "-", plain.lower())[: 63 - len(digest) - 1].rstrip("-")
    return f"{cut}-{digest}"


def principals(exp: ExperimentConfig, clients: list[str]) -> list[Principal]:
    """Every user an experiment needs: a producer per client, a worker per variant (or pool), an
    operator, KEDA and the gateway."""
    for c in clients:
        if not CLIENT_PATTERN.fullmatch(c):
            raise ConfigError(f"client name {c!r} must be lower-case letters, digits and '-', at most 31 characters")
        if c in RESERVED_CLIENTS:
            raise ConfigError(f"client name {c!r} is reserved ({RESERVED_CLIENTS[c]}); name the client otherwise")
    out = [
        Principal("producer", f"producer-{c}", user_name(exp, "producer", c), tuple(producer(exp, c))) for c in clients
    ]
    out += [
        Principal("worker", f"worker-{u}", user_name(exp, "worker", u), tuple(worker(exp, u)))
        for u in exp.serving_units()
    ]
    out.append(Principal("operator", "operator", user_name(exp, "operator"), tuple(operator(exp))))
    out.append(Principal("keda", "keda", user_name(exp, "keda"), tuple(keda(exp))))
    out.append(Principal("gateway", "gateway", user_name(exp, "gateway"), tuple(gateway(exp))))
    users = [p.user for p in out]
    if twice := sorted({u for u in users if users.count(u) > 1}):
        raise ConfigError(f"two principals would share Kafka user {twice[0]}; give them distinct names")
    return out


_OPERATIONS = {
    "Read": "READ",
    "Write": "WRITE",
    "Create": "CREATE",
    "Delete": "DELETE",
    "Alter": "ALTER",
    "Describe": "DESCRIBE",
    "DescribeConfigs": "DESCRIBE_CONFIGS",
    "AlterConfigs": "ALTER_CONFIGS",
    "IdempotentWrite": "IDEMPOTENT_WRITE",
}
_RESOURCES = {"topic": "TOPIC", "group": "GROUP", "transactionalId": "TRANSACTIONAL_ID", "cluster": "CLUSTER"}


def kafka_acls(principal: Principal) -> list:
    """The principal's grants as kafka-python ACLs (one per operation), for create_acls."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    out = []
    for g in principal.grants:
        pattern = ResourcePattern(
            ResourceType[_RESOURCES[g.resource]],
            g.name,
            ACLResourcePatternType.PREFIXED if g.pattern == "prefix" else ACLResourcePatternType.LITERAL,
        )
        for op in g.operations:
            out.append(
                ACL(f"User:{principal.user}", "*", ACLOperation[_OPERATIONS[op]], ACLPermissionType.ALLOW, pattern)
            )
    return out


def apply(admin, principal: Principal) -> None:
    """Create the principal's ACLs (creating one that exists is a no-op)."""
    result = admin.create_acls(kafka_acls(principal))
    if result["failed"]:
        acl, error = result["failed"][0]
        raise ConfigError(f"creating ACLs for {principal.user} failed: {error} ({acl})")
