"""Where file contents live (a directory: a PersistentVolume in Kubernetes, shared by the replicas),
and the line-by-line check of a batch input file on upload, so that a bad line is refused with its
line number before a batch is ever made of it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
from pydantic import ValidationError

from abqueue.gateway.openai_api import ApiError, request_fields
from schemas import ExperimentConfig, InferenceRequest
from schemas.body import ENDPOINTS
from schemas.codec import describe

SHOWN_BAD_LINES = 20  # a refusal names this many bad lines, then counts the rest


class Storage:
    def __init__(self, root: Path):
        self.root = root
        for sub in ("files", "batches"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)  # callers' data: not for other users
        os.chmod(root, 0o700)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def batch_dir(self, batch_id: str) -> Path:
        d = self.root / "batches" / batch_id
        d.mkdir(exist_ok=True, mode=0o700)
        return d


@dataclass
class Checked:
    lines: int
    bytes: int
    model: str
    url: str


def check_batch_input(
    src: BinaryIO, dest: Path, experiments: dict[str, ExperimentConfig], max_lines: int, max_bytes: int
) -> Checked:
    """Copies the upload to `dest` line by line, checking each as an OpenAI Batch input line for this
    gateway: JSON with a unique custom_id, POST to one endpoint, a body whose model is one of the
    experiments (the same on every line) and whose parameters make a valid request. ApiError 400
    names the bad lines; 413 past the limits."""
    bad: list[str] = []
    seen: dict[str, int] = {}
    count = size = 0
    model = url = None
    with dest.open("wb") as out:
        os.chmod(dest, 0o600)
        for n, raw in enumerate(src, 1):
            size += len(raw)
            if size > max_bytes:
                raise ApiError(413, f"the file is over this gateway's {max_bytes} bytes (--max-file-bytes)", "file_too_large")  # fmt: skip
            if not raw.strip():
                continue
            count += 1
            if count > max_lines:
                raise ApiError(413, f"the file has more than this gateway's {max_lines} requests (--max-file-lines)", "file_too_large")  # fmt: skip
            problem = _check_line(n, raw, experiments, seen)
            if problem is None:
                obj = orjson.loads(raw)
                if url is None:
                    url, model = obj["url"], obj["body"]["model"]
                elif obj["url"] != url:
                    problem = f"url {obj['url']} differs from the first line's {url} (one endpoint per file)"
                elif obj["body"]["model"] != model:
                    problem = f"model {obj['body']['model']!r} differs from the first line's {model!r} (one per file)"
            if problem is not None:
                bad.append(f"line {n}: {problem}")
                continue
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        out.flush()
        os.fsync(out.fileno())
    if bad:
        more = f" (and {len(bad) - SHOWN_BAD_LINES} more)" if len(bad) > SHOWN_BAD_LINES else ""
        raise ApiError(400, f"{len(bad)} invalid lines{more}: " + "; ".join(bad[:SHOWN_BAD_LINES]), "invalid_file", "file")  # fmt: skip
    if not count or model is None or url is None:
        raise ApiError(400, "the file has no requests", "invalid_file", "file")
    return Checked(count, size, model, url)


def _check_line(n: int, raw: bytes, experiments: dict[str, ExperimentConfig], seen: dict[str, int]) -> str | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return f"not JSON ({e})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return "custom_id must be a non-empty string"
    if cid in seen:
        return f"custom_id {cid!r} repeats line {seen[cid]}'s"
    seen[cid] = n
    if obj.get("method") != "POST":
        return "method must be POST"
    url = obj.get("url")
    if url not in ENDPOINTS:
        return f"url must be one of {', '.join(ENDPOINTS)}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "body must be a JSON object"
    name = body.get("model")
    if name not in experiments:
        return f"model {name!r} is not an experiment of this gateway ({', '.join(experiments)}); batches are assigned by its weights"  # fmt: skip
    try:
        fields = request_fields(body, url, cid)
        InferenceRequest(**{**fields, "experiment": name})
    except ApiError as e:
        return e.message
    except ValidationError as e:
        return describe(e, whole="(body)")
    return None
