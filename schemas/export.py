"""JSON Schema files of the contracts, checked in for producers written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.deadletter import DeadLetter
from schemas.experiment import ExperimentConfig
from schemas.feedback import Feedback
from schemas.request import InferenceRequest
from schemas.response import InferenceResponse

MODELS: dict[str, type[BaseModel]] = {
    "inference_request": InferenceRequest,
    "inference_response": InferenceResponse,
    "dead_letter": DeadLetter,
    "feedback": Feedback,
    "experiment_config": ExperimentConfig,
}
DEFAULT_DIR = Path(__file__).parent / "jsonschema"


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path | None = None) -> list[Path]:
    d = Path(directory or DEFAULT_DIR)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in MODELS.items():
        path = d / f"{name}.schema.json"
        path.write_text(render(model))
        paths.append(path)
    return paths


def check(directory: Path | None = None) -> list[Path]:
    """Files that are missing or differ from what the models give now."""
    d = Path(directory or DEFAULT_DIR)
    stale = []
    for name, model in MODELS.items():
        path = d / f"{name}.schema.json"
        if not path.exists() or path.read_text() != render(model):
            stale.append(path)
    return stale
