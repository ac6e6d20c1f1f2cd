"""The message contracts of abqueue: the one source of truth shared by producers and workers."""

from schemas.codec import SchemaError, decode_request, decode_response, encode
from schemas.deadletter import DeadLetter
from schemas.experiment import (
    ConfigError,
    ExperimentConfig,
    VariantConfig,
    demo_experiment,
    load_experiment,
)
from schemas.feedback import Feedback
from schemas.request import PRIORITIES, ChatMessage, InferenceRequest
from schemas.response import ErrorInfo, InferenceResponse, Timings, Usage, unit_of

__all__ = [
    "PRIORITIES",
    "ChatMessage",
    "ConfigError",
    "DeadLetter",
    "ErrorInfo",
    "ExperimentConfig",
    "Feedback",
    "InferenceRequest",
    "InferenceResponse",
    "SchemaError",
    "Timings",
    "Usage",
    "VariantConfig",
    "decode_request",
    "decode_response",
    "demo_experiment",
    "encode",
    "load_experiment",
    "unit_of",
]
