"""Message: one consumed record on its way through a batch, and what became of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka.consumer.fetcher import ConsumerRecord

from abqueue.kafka import tracing
from schemas import DeadLetter, ErrorInfo, InferenceRequest, InferenceResponse, Timings, Usage
from schemas.answers import generated_body
from schemas.deadletter import DeadLetterReason
from schemas.response import FinishReason, unit_of
from workers.engines.base import Completion, EngineDead

if TYPE_CHECKING:
    from workers.worker import Worker


@dataclass
class Message:
    record: ConsumerRecord
    dequeued_at: float = field(default_factory=time.time)
    variant: str = ""  # the variant whose topic the record came from (a pool's worker serves several)
    # The caller's prompt length, before the variant's system prompt or a hook changed it: the response
    # reports this, a covariate that must not depend on the variant.
    prompt_chars: int | None = None
    request: InferenceRequest | None = None
    response: InferenceResponse | None = None
    dead_letter: DeadLetter | None = None
    started: float | None = None  # when the engine took it
    completion: Completion | None = None  # what the engine made of it
    engine_dead: EngineDead | None = None  # the engine died with it: no answer, the offset stays unanswered
    address: dict[str, str] = field(default_factory=dict)  # id, routing_key, reply_to of an undecodable request
    reply_to: str | None = None  # a reply topic validation allowed; the sink writes nowhere else
    outbox: list | None = None  # records of its answer Kafka has not acknowledged yet (built at first publish)
    sending: list = field(default_factory=list)  # (record, send result) of the publish in progress
    stream: Any = None  # its ChunkStream, while a streamed request is with the engine (workers/streams.py)

    @property
    def done(self) -> bool:
        """Decided before the engine ran: dead-lettered, or answered (e.g. expired)."""
        return self.response is not None or self.dead_letter is not None

    @property
    def enqueued_at(self) -> float:
        return self.record.timestamp / 1000

    @property
    def traceparent(self) -> str | None:
        return tracing.header_value(self.record.headers)

    def reject(self, reason: DeadLetterReason, detail: str, worker: Worker) -> None:
        """Dead-letter the record; a caller whose request id can be read is answered at once with an
        `invalid_request` error naming the reason, rather than waiting out its timeout."""
        r = self.record
        self.dead_letter = DeadLetter(
            reason=reason,
            detail=detail,
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            original_key_b64=DeadLetter.b64(r.key),
            original_value_b64=DeadLetter.b64(r.value or b"") or "",
            request_id=self.request_id,
            worker_id=worker.worker_id,
        )
        if reason == "reply_to_refused":
            self.reply_to = None
        if self.request_id is not None:
            self.answer(
                variant=self.variant,
                model=worker.engine.model,
                worker_id=worker.worker_id,
                finish_reason="error",
                error=ErrorInfo(code="invalid_request", message=f"{reason}: {detail}"),
                experiment=worker.experiment.name,
            )

    @property
    def request_id(self) -> str | None:
        return self.request.id if self.request else self.address.get("id")

    @property
    def routing_key(self) -> str | None:
        return self.request.routing_key if self.request else self.address.get("routing_key")

    def response_key(self) -> bytes:
        """The key of its response records (and of its stream's parts, which so share a partition)."""
        return (self.routing_key or self.request_id or "").encode()

    def answer(
        self,
        *,
        variant: str,
        model: str,
        worker_id: str,
        outputs: list[str] | None = None,
        finish_reason: FinishReason | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        first_token: float | None = None,
        error: ErrorInfo | None = None,
        logprobs: list | None = None,
        body: dict | None = None,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        experiment: str = "",
    ) -> None:
        """experiment: what an undecodable request is answered as (its own claim is not trusted).
        ttft_s, tpot_s: where the engine measured them itself (vLLM's serving layer), in place of the
        worker's reckoning from first_token."""
        req, rid = self.request, self.request_id
        assert rid is not None, "only a request whose id can be read is answered"
        finished = time.time()
        chars = None
        if req is not None:
            chars = self.prompt_chars if self.prompt_chars is not None else req.prompt_chars()
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, prompt_chars=chars)
        ttft, tpot = ttft_s, tpot_s
        if ttft is None and first_token is not None and self.started is not None and req is not None:
            ttft = max(0.0, first_token - self.started)
            per_sample = completion_tokens / max(1, req.asks().n)
            if per_sample > 1:
                tpot = max(0.0, finished - first_token) / (per_sample - 1)
        if first_token is None and ttft is not None and self.started is not None:
            first_token = self.started + ttft
        exp_name = req.experiment if req else experiment
        self.response = InferenceResponse(
            request_id=rid,
            experiment=exp_name,
            variant=variant,
            assigned_by=req.assigned_by if req else None,
            config_version=req.config_version if req else None,
            unit=unit_of(exp_name, key) if (key := self.routing_key) else None,
            model=model,
            endpoint=req.endpoint if req is not None and req.body is not None else None,
            body=body,
            outputs=outputs or [],
            finish_reason=finish_reason,
            logprobs=logprobs,
            usage=usage,
            timings=Timings(
                enqueued=self.enqueued_at,
                dequeued=self.dequeued_at,
                started=self.started,
                first_token=first_token,
                finished=finished,
                ttft_s=ttft,
                tpot_s=tpot,
            ),
            worker_id=worker_id,
            error=error,
            caller_tag=req.caller_tag if req else self.address.get("caller_tag"),
        )

    def answer_completion(self, *, model: str, worker_id: str) -> None:
        c = self.completion
        assert c is not None, "answer_completion needs what the engine made"
        outputs, logprobs, body = c.outputs, c.logprobs, c.body
        req = self.request
        if req is not None and req.body is not None and c.error is None:
            # A request with a body is answered with an OpenAI body: the engine's own (vLLM's serving
            # layer), or one made from the texts of an engine without it, in the same shape.
            if body is None:
                assert req.endpoint is not None
                body = generated_body(
                    req.endpoint, req.id, model, outputs, c.finish_reason, logprobs,
                    c.prompt_tokens, c.completion_tokens,
                )  # fmt: skip
            outputs, logprobs = [], None
        self.answer(
            variant=self.variant,
            model=model,
            worker_id=worker_id,
            outputs=outputs,
            finish_reason=c.finish_reason,
            error=c.error,
            logprobs=logprobs,
            body=body,
            first_token=c.first_token_at,
            ttft_s=c.ttft_s,
            tpot_s=c.tpot_s,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
        )
