"""The gateway's reply topics, under the experiment's own reply prefix (abq.<experiment>.replies.*),
so that workers may answer there and the ACLs of a producer cover them."""

from __future__ import annotations

from abqueue.gateway.records import MAX_WINDOW_S
from abqueue.kafka.acls import GATEWAY_CLIENT, reply_prefix
from schemas import ExperimentConfig

REPLY_RETENTION_MS = 3_600_000  # a reply topic holds answers for callers waiting now, not history
BATCH_REPLY_RETENTION_MS = (MAX_WINDOW_S + 86_400) * 1000  # longer than a batch's longest window


def reply_topic(experiment: ExperimentConfig, instance: str) -> str:
    """One gateway instance's: the synchronous endpoints' answers."""
    return f"{reply_prefix(experiment, GATEWAY_CLIENT)}{instance}"


def batch_reply_topic(experiment: ExperimentConfig) -> str:
    """Where batches' answers come, shared by the replicas: a batch resumed by another replica reads
    on from where its state file says (and no batch reads the whole responses topic)."""
    return f"{reply_prefix(experiment, GATEWAY_CLIENT)}batches"
