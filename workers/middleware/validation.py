"""Validation: decode and check every record; what cannot be served goes to the dead-letter topic."""

from __future__ import annotations

from schemas import SchemaError, decode_request
from workers.middleware import Middleware


class Validation(Middleware):
    def before_batch(self, worker, batch) -> None:
        exp, variant = worker.experiment, worker.variant
        for m in batch:
            if m.done:
                continue
            try:
                m.request = decode_request(m.record.value or b"")
            except SchemaError as e:
                m.reject(e.reason, e.detail, worker.worker_id)
                continue
            req = m.request
            if req.experiment != exp.name:
                m.reject(
                    "wrong_experiment",
                    f"request is for experiment {req.experiment!r}, this topic serves {exp.name!r}",
                    worker.worker_id,
                )
            elif req.variant is None:
                m.reject(
                    "wrong_variant",
                    "request has no variant; publish it through an abqueue producer, which assigns one",
                    worker.worker_id,
                )
            elif req.variant != variant.name:
                m.reject(
                    "wrong_variant",
                    f"request is for variant {req.variant!r}, this topic serves {variant.name!r}",
                    worker.worker_id,
                )
            elif req.max_tokens > variant.max_tokens_limit:
                m.reject(
                    "invalid_params",
                    f"max_tokens {req.max_tokens} exceeds the variant's limit of {variant.max_tokens_limit}",
                    worker.worker_id,
                )
            elif req.prompt_chars() > variant.max_prompt_chars:
                m.reject(
                    "oversized_prompt",
                    f"prompt of {req.prompt_chars()} characters exceeds the variant's limit of {variant.max_prompt_chars}",
                    worker.worker_id,
                )
