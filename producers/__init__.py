"""Producers: assign requests to variants and publish them; wait for responses; run bulk jobs."""

from producers.assignment import BUCKETS, assign_variant, bucket_of
from producers.client import AbqClient, ReplyTimeout, Stream, StreamError
from producers.publisher import RequestPublisher, RequestTooLarge

__all__ = [
    "BUCKETS",
    "AbqClient",
    "ReplyTimeout",
    "RequestPublisher",
    "RequestTooLarge",
    "Stream",
    "StreamError",
    "assign_variant",
    "bucket_of",
]
