"""Validation: decode and check every record; what cannot be served goes to the dead-letter topic
(and, where its id can be read, an `invalid_request` answer to its caller). It is also the one gate
for `reply_to`: the sink writes a copy only where this middleware allowed it. A request that passes
gets its variant's treatment (system prompt, sampling settings: workers/treatment.py)."""

from __future__ import annotations

from abqueue.kafka.header_keys import unreadable_header_keys
from schemas import SchemaError, decode_request
from workers.middleware import Middleware
from workers.treatment import apply_variant


class Validation(Middleware):
    def before_batch(self, worker, batch) -> None:
        exp = worker.experiment
        for m in batch:
            if m.done:
                continue
            variant = worker.variant_of(m)
            try:
                m.request = decode_request(m.record.value or b"")
            except SchemaError as e:
                m.address = e.address
                self._allow_reply(m, exp, e.address.get("reply_to"))
                m.reject(e.reason, e.detail, worker)
                continue
            req = m.request
            refused = self._allow_reply(m, exp, req.reply_to) if req.experiment == exp.name else None
            if unreadable := unreadable_header_keys(m.record.headers):
                m.reject(
                    "invalid_header",
                    f"header key {unreadable[0]!r} is not UTF-8; Kafka header keys are strings",
                    worker,
                )
            elif req.experiment != exp.name:
                m.reject(
                    "wrong_experiment",
                    f"request is for experiment {req.experiment!r}, this topic serves {exp.name!r}",
                    worker,
                )
            elif refused is not None:
                m.reject("reply_to_refused", refused, worker)
            elif req.variant is None:
                m.reject(
                    "wrong_variant",
                    "request has no variant; publish it through an abqueue producer, which assigns one",
                    worker,
                )
            elif req.variant != variant.name:
                m.reject(
                    "wrong_variant",
                    f"request is for variant {req.variant!r}, this topic serves {variant.name!r}",
                    worker,
                )
            elif (asks := req.asks()).max_tokens is not None and asks.max_tokens > variant.max_tokens_limit:
                m.reject(
                    "invalid_params",
                    f"max_tokens {asks.max_tokens} exceeds the variant's limit of {variant.max_tokens_limit}",
                    worker,
                )
            elif asks.prompt_chars > variant.max_prompt_chars:
                m.reject(
                    "oversized_prompt",
                    f"prompt of {asks.prompt_chars} characters exceeds the variant's limit of {variant.max_prompt_chars}",
                    worker,
                )
            elif (asks.top_logprobs or 0) > variant.max_top_logprobs:
                m.reject(
                    "invalid_params",
                    f"top_logprobs {asks.top_logprobs} exceeds the variant's limit of {variant.max_top_logprobs}",
                    worker,
                )
            elif asks.stream and not m.reply_to:
                # Chunks go to the caller's own reply topic; the responses topic is every reader's.
                m.reject(
                    "invalid_params",
                    "stream: true needs a reply_to topic to stream to (AbqClient(reply_topic=...), or the gateway)",
                    worker,
                )
            elif req.body is not None and req.body.get("chat_template") is not None:
                # The chat template is the variant's (its treatment); a caller's Jinja never runs on a worker.
                m.reject("unsupported", "chat_template is the variant's setting; leave it out of the body", worker)
            else:
                m.prompt_chars = asks.prompt_chars
                m.request = apply_variant(req, variant)

    @staticmethod
    def _allow_reply(m, exp, topic: str | None) -> str | None:
        """Sets m.reply_to where the experiment allows `topic`; returns why not otherwise."""
        if not topic or topic == exp.response_topic:
            return None
        refused = exp.reply_to_refusal(topic)
        if refused is None:
            m.reply_to = topic
        return refused
