"""OpenAI's Files and Batches endpoints. A tenant sees only its own files and batches: another's are
404, as if they did not exist."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from abqueue.gateway.files import check_batch_input
from abqueue.gateway.openai_api import ApiError
from abqueue.gateway.records import MAX_WINDOW_S, TERMINAL, BatchRecord, FileRecord, RequestCounts, window_seconds

if TYPE_CHECKING:
    from abqueue.gateway.app import Gateway


FORM_OVERHEAD = 64 * 1024  # the multipart envelope and the small fields around the file
MAX_FORM_FIELDS = 8  # purpose, and room for what SDKs add; each at most FORM_OVERHEAD


async def _bounded_form(request: Request, max_file_bytes: int) -> FormData:
    """The upload's form, refused (413) as soon as the body crosses the file limit plus the form's
    envelope: by its Content-Length before a byte is read, else while it streams in. Fields
    other than the file are few and small."""
    limit = max_file_bytes + FORM_OVERHEAD
    too_large = ApiError(413, f"the upload is over this gateway's {max_file_bytes} bytes (--max-file-bytes)", "file_too_large")  # fmt: skip
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise too_large

    async def counted():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_large
            yield chunk

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload the file as multipart/form-data", "invalid_value", "file")
    parser = MultiPartParser(
        request.headers, counted(), max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=FORM_OVERHEAD
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"the upload's form: {e.message}", "invalid_value", "file") from None
    request.scope["abq.form"] = form
    return form


def files_and_batches(app: FastAPI, gateway: Gateway, tenant_of, error) -> None:
    def enabled() -> tuple:
        if gateway.storage is None or gateway.files is None or gateway.batches is None:
            raise ApiError(404, "files and batches need the gateway's --storage directory", "not_enabled")
        return gateway.storage, gateway.files, gateway.batches

    def own_file(tenant: str, file_id: str) -> FileRecord:
        f = enabled()[1].get(file_id)
        if f is None or f.tenant != tenant:
            raise ApiError(404, f"no such file: {file_id}", "file_not_found", "file_id")
        return f

    def own_batch(tenant: str, batch_id: str) -> BatchRecord:
        b = enabled()[2].get(batch_id)
        if b is None or b.tenant != tenant:
            raise ApiError(404, f"no such batch: {batch_id}", "batch_not_found", "batch_id")
        return b

    def answers(handler):
        """Runs a handler, turning ApiError into OpenAI's error shape."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request, tenant_of(request), **request.path_params)
            except ApiError as e:
                return error(e)

        run.__name__ = handler.__name__
        return run

    @answers
    async def upload(request: Request, tenant: str) -> Response:
        try:
            return await _upload(request, tenant)
        finally:
            if (form := request.scope.get("abq.form")) is not None:
                await form.close()  # the spooled file part

    async def _upload(request: Request, tenant: str) -> Response:
        storage, files, _ = enabled()
        form = await _bounded_form(request, gateway.limits.max_file_bytes)
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose!r} is not supported; upload batch input with purpose=batch", "invalid_value", "purpose")  # fmt: skip
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "a multipart 'file' part is required", "missing_required_parameter", "file")
        fid = f"file-{uuid.uuid4().hex}"
        dest = storage.path(f"files/{fid}")
        try:
            checked = await anyio.to_thread.run_sync(
                check_batch_input, upload.file, dest, gateway.experiments,
                gateway.limits.max_file_lines, gateway.limits.max_file_bytes,
            )  # fmt: skip
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        record = FileRecord(
            id=fid, bytes=checked.bytes, created_at=int(time.time()), filename=upload.filename or "batch.jsonl",
            purpose="batch", tenant=tenant, path=f"files/{fid}", lines=checked.lines, model=checked.model,
            url=checked.url,
        )  # fmt: skip
        await anyio.to_thread.run_sync(files.put, fid, record)  # waits for Kafka: off the event loop
        return JSONResponse(record.api())

    @answers
    async def list_files(request: Request, tenant: str) -> Response:
        _, files, _ = enabled()
        purpose = request.query_params.get("purpose")
        mine = [f for f in files.values() if f.tenant == tenant and (purpose is None or f.purpose == purpose)]
        return _page(request, mine, default_limit=10_000)

    @answers
    async def get_file(request: Request, tenant: str, file_id: str) -> Response:
        return JSONResponse(own_file(tenant, file_id).api())

    @answers
    async def file_content(request: Request, tenant: str, file_id: str) -> Response:
        f = own_file(tenant, file_id)
        return FileResponse(enabled()[0].path(f.path), media_type="application/jsonl")

    @answers
    async def delete_file(request: Request, tenant: str, file_id: str) -> Response:
        storage, files, _ = enabled()
        f = own_file(tenant, file_id)
        await anyio.to_thread.run_sync(files.put, file_id, None)
        storage.path(f.path).unlink(missing_ok=True)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @answers
    async def create_batch(request: Request, tenant: str) -> Response:
        _, _, batches = enabled()
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"the body is not JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_body")
        source = own_file(tenant, str(body.get("input_file_id")))
        if source.purpose != "batch":
            raise ApiError(400, f"file {source.id} is not batch input (purpose {source.purpose})", "invalid_value", "input_file_id")  # fmt: skip
        url = source.url or ""
        if body.get("endpoint") != url:
            raise ApiError(400, f"endpoint must be {url}, the one every line of {source.id} names", "invalid_value", "endpoint")  # fmt: skip
        window = str(body.get("completion_window", "24h"))
        seconds = window_seconds(window)
        if seconds is None or not 1 <= seconds <= MAX_WINDOW_S:
            raise ApiError(400, f"completion_window {window!r} is not a duration from 1s to 7d, like 24h or 30m", "invalid_value", "completion_window")  # fmt: skip
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            raise ApiError(400, "metadata must be an object of at most 16 string pairs", "invalid_value", "metadata")
        now = int(time.time())
        bid = f"batch_{uuid.uuid4().hex}"
        record = BatchRecord(
            id=bid, endpoint=url, input_file_id=source.id, completion_window=window, created_at=now,
            expires_at=now + seconds, tenant=tenant, model=source.model,
            metadata={str(k): str(v) for k, v in metadata.items()} if metadata else None,
            request_counts=RequestCounts(total=source.lines),
        )  # fmt: skip
        kept = await anyio.to_thread.run_sync(batches.put, bid, record)
        assert kept is not None
        return JSONResponse(kept.api())

    @answers
    async def get_batch(request: Request, tenant: str, batch_id: str) -> Response:
        return JSONResponse(own_batch(tenant, batch_id).api())

    @answers
    async def list_batches(request: Request, tenant: str) -> Response:
        mine = [b for b in enabled()[2].values() if b.tenant == tenant]
        return _page(request, mine, default_limit=20)

    @answers
    async def cancel_batch(request: Request, tenant: str, batch_id: str) -> Response:
        b = own_batch(tenant, batch_id)
        if b.status in TERMINAL or b.status == "cancelling":
            if b.status in ("cancelled", "cancelling"):
                return JSONResponse(b.api())
            raise ApiError(409, f"batch {batch_id} is {b.status} and cannot be cancelled", "batch_not_cancellable")
        cancelling = b.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time())})
        kept = await anyio.to_thread.run_sync(enabled()[2].put, batch_id, cancelling)
        assert kept is not None
        if kept.status in TERMINAL and kept.status != "cancelled":  # it ended meanwhile: the end stands
            raise ApiError(409, f"batch {batch_id} is {kept.status} and cannot be cancelled", "batch_not_cancellable")
        return JSONResponse(kept.api())

    app.add_api_route("/v1/files", upload, methods=["POST"])
    app.add_api_route("/v1/files", list_files, methods=["GET"])
    app.add_api_route("/v1/files/{file_id}", get_file, methods=["GET"])
    app.add_api_route("/v1/files/{file_id}/content", file_content, methods=["GET"])
    app.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"])
    app.add_api_route("/v1/batches", create_batch, methods=["POST"])
    app.add_api_route("/v1/batches", list_batches, methods=["GET"])
    app.add_api_route("/v1/batches/{batch_id}", get_batch, methods=["GET"])
    app.add_api_route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"])


def _page(request: Request, items: list, default_limit: int) -> Response:
    """Newest first, `limit` at a time after the id `after` (OpenAI's cursor pages)."""
    items = sorted(items, key=lambda x: (x.created_at, x.id), reverse=True)
    after = request.query_params.get("after")
    if after:
        ids = [x.id for x in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = max(1, min(int(request.query_params.get("limit", default_limit)), default_limit))
    except ValueError:
        raise ApiError(400, "limit must be a whole number", "invalid_value", "limit") from None
    page = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": [x.api() for x in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(items) > limit,
        }
    )
