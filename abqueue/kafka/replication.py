"""How many copies of each topic abqueue creates, and which existing topics have fewer."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from abqueue.errors import AbqError


class ReplicationError(AbqError):
    pass


@dataclass(frozen=True)
class Replication:
    factor: int
    min_insync: int

    def __str__(self) -> str:
        return f"{self.factor} replicas, min.insync.replicas {self.min_insync}"

    def topic_configs(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}


def default_replication(brokers: int) -> Replication:
    """What production runs: three copies, two of which a write must reach, so a broker can fail
    (or restart) without losing an acknowledged request; a smaller cluster cannot, so 1 and 1."""
    return Replication(3, 2) if brokers >= 3 else Replication(1, 1)


def resolve(factor: int | None, min_insync: int | None, brokers: int | None) -> Replication:
    """The experiment's settings, the unset ones filled in for a cluster of `brokers` (None: one of
    unknown size, such as a Strimzi cluster a manifest is rendered for, taken as production's 3+)."""
    factor = factor or default_replication(3 if brokers is None else brokers).factor
    chosen = Replication(factor, min_insync or (2 if factor >= 3 else 1))
    if chosen.min_insync > chosen.factor:
        raise ReplicationError(
            f"min_insync_replicas {chosen.min_insync} is more than the {chosen.factor} replicas: no write could "
            "succeed; lower min_insync_replicas in the experiment"
        )
    if brokers is not None and chosen.factor > brokers:
        raise ReplicationError(
            f"replication_factor {chosen.factor} needs {chosen.factor} brokers but the cluster has {brokers}; "
            "lower replication_factor in the experiment, or add brokers (`abq kafka up --brokers 3`)"
        )
    return chosen


def cluster_brokers(admin: KafkaAdminClient) -> int:
    return len(admin.describe_cluster()["brokers"])


def for_experiment(admin: KafkaAdminClient, factor: int | None, min_insync: int | None) -> Replication:
    return resolve(factor, min_insync, cluster_brokers(admin))


def weaker_topics(admin: KafkaAdminClient, described: dict[str, dict], want: Replication) -> list[str]:
    """Existing topics (name -> the metadata describe_topics gave) with fewer replicas, or a lower
    min.insync.replicas, than `want`: one line each."""
    if not described:
        return []
    out = []
    topics = sorted(described)
    configs = admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, configs=None) for t in topics], config_filter="all"
    )
    for name in topics:
        parts = described[name].get("partitions") or []
        if not parts:
            continue
        replicas = min(len(p["replica_nodes"]) for p in parts)
        try:
            isr = int(configs["topic"][name]["min.insync.replicas"]["value"])
        except (KeyError, TypeError, ValueError):
            isr = want.min_insync  # not ours to read (ACLs): judged on the replicas alone
        if replicas < want.factor or isr < want.min_insync:
            out.append(
                f"{name} has {replicas} replicas and min.insync.replicas {isr}, configured {want.factor} and "
                f"{want.min_insync}: a broker's loss can lose its records; raise them with kafka-reassign-partitions "
                "and kafka-configs (or recreate the topic)"
            )
    return out
