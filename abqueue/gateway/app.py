"""`abq gateway`: OpenAI's chat, completion and embedding endpoints over abqueue's queues. A request names an
experiment as its `model` (`experiment:variant` pins a variant), is assigned by the experiment's
weights and overrides like any producer's, queued, served by the variant's workers and answered
from this gateway's own reply topic, with `x-abq-variant` and `x-abq-request-id` headers."""

from __future__ import annotations

import logging
import threading
import time
import typing
import uuid
from collections import Counter as Counter_
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from abqueue.errors import AbqError
from abqueue.gateway.backlog import Backlog
from abqueue.gateway.batch_api import files_and_batches
from abqueue.gateway.batches import BatchRunner
from abqueue.gateway.files import Storage
from abqueue.gateway.mirror import Mirror
from abqueue.gateway.naming import BATCH_REPLY_RETENTION_MS, REPLY_RETENTION_MS, batch_reply_topic, reply_topic
from abqueue.gateway.openai_api import ApiError, request_fields, validation_error
from abqueue.gateway.records import (
    BATCH_PARTITIONS,
    BATCHES_TOPIC,
    FILES_TOPIC,
    BatchRecord,
    BatchStatus,
    FileRecord,
    merge_batch,
)
from abqueue.gateway.streaming import StreamMetrics, stream_response
from abqueue.gateway.tenants import Tenants
from abqueue.kafka import KafkaSettings, ensure_topic
from abqueue.kafka.clients import KafkaUnavailable
from producers import openai_batch
from producers.client import MAX_BUFFERED_PARTS, AbqClient, ReplyTimeout
from producers.publisher import RequestTooLarge
from schemas import ConfigError, ExperimentConfig, InferenceRequest
from schemas.body import CHAT, COMPLETIONS, EMBEDDINGS

log = logging.getLogger(__name__)

ROUTING_HEADER = "x-abq-routing-key"


@dataclass
class Limits:
    request_timeout_s: float = 60.0  # a caller waits this long for its answer, then gets 504
    max_body_bytes: int = 1_000_000
    max_backlog: int | None = None  # per variant; over it, 429 (None: never shed)
    max_waiting: int = 512  # requests waiting for their answers at once; the rest queue in the server
    max_stream_parts: int = MAX_BUFFERED_PARTS  # a stream's records waiting for a slow reader; more ends it
    max_file_lines: int = 50_000  # OpenAI's limits per batch input file
    max_file_bytes: int = 200_000_000


def metadata_header(key: str) -> str:
    """The request header that carries metadata `key` for segment overrides: `x-` and the key with
    '-' for '_' (user_group: x-user-group), lower-case; a key already starting with x- is its own."""
    key = key.lower().replace("_", "-")
    return key if key.startswith("x-") else f"x-{key}"


class Gateway:
    """The gateway's state: one client per experiment (publishing, and reading this instance's
    reply topic), the tenants, the backlog readers, and the metrics."""

    def __init__(
        self,
        settings: KafkaSettings,
        experiments: list[ExperimentConfig],
        tenants: Tenants,
        instance: str,
        limits: Limits | None = None,
        storage: Path | None = None,
    ):
        """storage: the directory for files and batches (the Files and Batches API); None serves
        only the synchronous endpoints."""
        self.tenants, self.limits = tenants, limits or Limits()
        self.experiments = {e.name: e for e in experiments}
        self.clients: dict[str, AbqClient] = {}
        self.backlogs: dict[str, Backlog] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "abq_gateway_requests", "Requests answered, by endpoint, status and variant",
            ["endpoint", "status", "variant"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "abq_gateway_request_seconds", "Time from a request's arrival to its answer, by endpoint", ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=self.registry,
        )  # fmt: skip
        self.batch_lines = Counter(
            "abq_gateway_batch_lines", "Batch lines finished by this replica, by result", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_metrics = StreamMetrics(self.registry)
        self.cancelled = Counter(
            "abq_gateway_cancels", "Requests cancelled because their caller went away before the answer",
            registry=self.registry,
        )  # fmt: skip
        self.batch_status = Gauge(
            "abq_gateway_batches", "Batches by status (every replica sees them all)", ["status"], registry=self.registry
        )
        self.storage: Storage | None = None
        self.files: Mirror[FileRecord] | None = None
        self.batches: Mirror[BatchRecord] | None = None
        self.runner: BatchRunner | None = None
        try:
            for exp in experiments:
                topic = reply_topic(exp, instance)
                if refused := exp.reply_to_refusal(topic):
                    raise ConfigError(f"the gateway's reply topic: {refused}")
                ensure_topic(settings, topic, configs={"retention.ms": str(REPLY_RETENTION_MS)})
                self.clients[exp.name] = AbqClient(
                    settings, exp, reply_topic=topic, follow=True, max_buffered_parts=self.limits.max_stream_parts
                )
                if self.limits.max_backlog is not None:
                    self.backlogs[exp.name] = Backlog(settings, exp, self.limits.max_backlog)
            if storage is not None:
                for exp in experiments:
                    topic = batch_reply_topic(exp)
                    if refused := exp.reply_to_refusal(topic):
                        raise ConfigError(f"the gateway's batch reply topic: {refused}")
                    # Kept for the longest window a batch may have, so a resumed batch finds its answers.
                    ensure_topic(
                        settings, topic, exp.partitions, configs={"retention.ms": str(BATCH_REPLY_RETENTION_MS)}
                    )
                self.storage = Storage(storage)
                self.files = Mirror(settings, FILES_TOPIC, FileRecord)
                self.batches = Mirror(settings, BATCHES_TOPIC, BatchRecord, BATCH_PARTITIONS, merge=merge_batch)
                lines = self.batch_lines
                self.runner = BatchRunner(
                    settings, self.experiments, self.storage, self.batches, self.files,
                    on_line=lambda result: lines.labels(result).inc(),
                )  # fmt: skip
        except BaseException:
            self.close()
            raise
        self.ready = threading.Event()
        self.ready.set()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        for m in (self.batches, self.files):
            if m is not None:
                m.close()
        for b in self.backlogs.values():
            b.close()
        for c in self.clients.values():
            c.close()

    def models(self) -> list[str]:
        """Every experiment, and each of its variants that a request may pin."""
        out = []
        for name, exp in self.experiments.items():
            out.append(name)
            out += [f"{name}:{v.name}" for v in exp.variants if v.shadow_of is None]
        return out

    def request(self, tenant: str, body: dict, url: str, headers) -> InferenceRequest:
        """The request an OpenAI body makes, assigned to its variant (pinned or by the experiment's
        weights and overrides), or ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_body")
        model = body.get("model")
        name, _, pinned = (model or "").partition(":") if isinstance(model, str) else ("", "", "")
        rid = f"gw-{uuid.uuid4().hex}"
        fields = request_fields(body, url, rid)
        exp = self.experiments.get(name)
        if exp is None:
            raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the experiments", "model_not_found", "model")  # fmt: skip
        if pinned and not any(v.name == pinned and v.shadow_of is None for v in exp.variants):
            raise ApiError(404, f"model {model!r}: experiment {name} has no variant {pinned!r} to pin", "model_not_found", "model")  # fmt: skip
        # Overrides match on metadata: the request headers they name are it (metadata_header), and the
        # tenant is the authenticated one whatever a caller sends.
        wanted = {metadata_header(k): k for o in exp.overrides for k in o.match if k != "tenant"}
        metadata = {**fields.pop("metadata", {}), **{key: headers[h] for h, key in wanted.items() if h in headers}}
        metadata["tenant"] = tenant
        fields.pop("routing_key")  # the batch line's: its custom_id where no user is given
        routing = body.get("user") or headers.get(ROUTING_HEADER) or tenant
        client = self.clients[name]
        try:
            request = InferenceRequest(
                **fields, experiment=name, routing_key=str(routing), variant=pinned or None, metadata=metadata,
                deadline=time.time() + self.limits.request_timeout_s, reply_to=client.listener.topic,
            )  # fmt: skip
        except ValidationError as e:
            raise validation_error(e) from None
        return client.publisher.assign(request)

    def shed(self, request: InferenceRequest) -> None:
        backlog = self.backlogs.get(request.experiment)
        assert request.variant is not None
        if backlog is not None and (wait := backlog.retry_after(request.variant)) is not None:
            raise ApiError(
                429,
                f"variant {request.variant} of {request.experiment} has {backlog.lag(request.variant)} requests waiting, "
                f"over this gateway's bound of {backlog.bound}; retry after {wait}s",
                "backlog_full", headers={"retry-after": str(wait)},
            )  # fmt: skip

    def answer(self, request: InferenceRequest, url: str) -> tuple[int, dict]:
        """Publishes the request and waits for its answer: (status, OpenAI body)."""
        client = self.clients[request.experiment]
        try:
            reply = client.submit(request, timeout=self.limits.request_timeout_s)
        except ReplyTimeout:
            raise ApiError(504, f"no answer within {self.limits.request_timeout_s:g}s (the gateway's --request-timeout)", "timeout") from None  # fmt: skip
        except RequestTooLarge as e:
            raise ApiError(413, str(e), "request_too_large") from None
        resp = reply.response
        if resp.error is None:
            return 200, openai_batch.completion_body(resp, url)
        return openai_batch.error_answer(resp)


async def answer_unless_gone(
    http: Request, gateway: Gateway, req: InferenceRequest, url: str, limiter: anyio.CapacityLimiter
) -> tuple[int, dict] | None:
    """gateway.answer, or None as soon as the caller has gone away (its request is then cancelled)."""
    outcome: list = []
    async with anyio.create_task_group() as tg:

        async def answer() -> None:
            try:
                outcome.append(
                    await anyio.to_thread.run_sync(gateway.answer, req, url, limiter=limiter, abandon_on_cancel=True)
                )
            except Exception as e:  # raised below, outside the task group (which would wrap it in a group)
                outcome.append(e)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            # The body has been read: the server's next message is the disconnect, whenever it comes.
            while (await http.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(answer)
        tg.start_soon(watch)
    if not outcome:
        return None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def unavailable(e: BaseException) -> ApiError:
    log.warning("Kafka did not take a request: %s: %s", type(e).__name__, e)
    return ApiError(503, f"Kafka is unavailable ({type(e).__name__}); retry the request", "kafka_unavailable",
                    headers={"retry-after": "1"})  # fmt: skip


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="abqueue gateway", docs_url=None, redoc_url=None, openapi_url=None)
    waiting = anyio.CapacityLimiter(gateway.limits.max_waiting)

    def error(e: ApiError, extra: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers={**e.headers, **(extra or {})})

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException) -> Response:
        # A path no route takes (404) or a method it does not (405): OpenAI's shape, as every answer.
        what = "no such endpoint" if exc.status_code == 404 else f"{request.method} is not allowed here"
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}", code))

    def tenant_of(request: Request) -> str:
        tenant = gateway.tenants.tenant(request.headers.get("authorization"))
        if tenant is None:
            raise ApiError(401, "missing or unknown API key; send Authorization: Bearer <key>", "invalid_api_key")
        return tenant

    async def completion(request: Request, url: str) -> Response:
        started, endpoint, variant = time.monotonic(), url.removeprefix("/v1/"), ""
        headers: dict[str, str] = {}
        response: Response
        try:
            tenant = tenant_of(request)
            size = request.headers.get("content-length")
            if size and size.isdigit() and int(size) > gateway.limits.max_body_bytes:
                raise ApiError(413, f"the body is {size} bytes, over this gateway's {gateway.limits.max_body_bytes}", "request_too_large")  # fmt: skip
            raw = await request.body()
            if len(raw) > gateway.limits.max_body_bytes:
                raise ApiError(413, f"the body is {len(raw)} bytes, over this gateway's {gateway.limits.max_body_bytes}", "request_too_large")  # fmt: skip
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise ApiError(400, f"the body is not JSON: {e}", "invalid_json") from None
            req = gateway.request(tenant, body, url, request.headers)
            variant = req.variant or ""
            headers = {"x-abq-variant": variant, "x-abq-request-id": req.id}
            gateway.shed(req)
            client = gateway.clients[req.experiment]

            def gone(how: str, rid: str = req.id) -> None:
                if how == "disconnected":  # nobody reads the answer: stop costing GPU time for it
                    gateway.cancelled.inc()
                    client.cancel(rid, wait=False)

            if req.body is not None and req.body.get("stream") is True:
                chunks = client.stream(req, timeout=gateway.limits.request_timeout_s)
                status, response = await stream_response(
                    chunks, headers, waiting, gateway.stream_metrics, started, on_end=gone
                )
            else:
                answered = await answer_unless_gone(request, gateway, req, url, waiting)
                if answered is None:
                    gone("disconnected")
                    answered = 499, {"error": {"message": "the caller went away", "type": "invalid_request_error",
                                               "param": None, "code": "cancelled"}}  # fmt: skip
                status, answer = answered
                response = JSONResponse(answer, status_code=status, headers=headers)
        except ApiError as e:
            status, response = e.status, error(e, headers)
        except (KafkaError, KafkaUnavailable) as e:  # a broker outage: the caller may retry, as for any 503
            status, response = 503, error(unavailable(e), headers)
        except AbqError as e:  # a user-fixable problem on this side (a config the live version refuses)
            status, response = 400, error(ApiError(400, str(e), "invalid_request"), headers)
        gateway.requests.labels(endpoint, str(status), variant).inc()
        gateway.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await completion(request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, COMPLETIONS)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await completion(request, EMBEDDINGS)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            tenant_of(request)
        except ApiError as e:
            return error(e)
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "abqueue"} for m in gateway.models()]
        return JSONResponse({"object": "list", "data": data})

    files_and_batches(app, gateway, tenant_of, error)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ok = gateway.ready.is_set()
        return JSONResponse({"status": "ready" if ok else "starting"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if gateway.batches is not None:
            by = Counter_(b.status for b in gateway.batches.values())
            for status in typing.get_args(BatchStatus):
                gateway.batch_status.labels(status).set(by.get(status, 0))
        return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)

    return app
