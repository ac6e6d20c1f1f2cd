"""Engines: thin adapters over what generates text (echo for tests and demos, vLLM for models).

The shared types live in `base`; `factory.make_engine` picks an engine from a variant's config.
"""

from workers.engines.base import (
    Completion,
    Engine,
    EngineDead,
    EngineError,
    Rejection,
    Result,
    StaticEngine,
    StreamingEngine,
    TransientEngineError,
)

__all__ = [
    "EngineDead",
    "Completion",
    "Engine",
    "EngineError",
    "Rejection",
    "Result",
    "StaticEngine",
    "StreamingEngine",
    "TransientEngineError",
]
