"""Producers: assign requests to variants and publish them; wait for responses; run bulk jobs."""

from producers.assignment import BUCKETS, assign_variant, bucket_of
from producers.client import AbqClient, ReplyTimeout
from producers.publisher import RequestPublisher, RequestTooLarge

__all__ = [
    "BUCKETS",
    "AbqClient",
    "ReplyTimeout",
    "RequestPublisher",
    "RequestTooLarge",
    "assign_variant",
    "bucket_of",
]
