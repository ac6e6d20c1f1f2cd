"""One way to retry with exponential backoff, shared by publishing, committing and the engine."""

from __future__ import annotations

import logging

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger("workers.backoff")


def retrying(what: str, on: type[BaseException] | tuple[type[BaseException], ...], attempts: int,
             first_wait_s: float = 0.2, max_wait_s: float = 5.0) -> Retrying:
    """Retries `on` up to `attempts` tries in all, logging each retry; the last error is re-raised."""
    return Retrying(
        retry=retry_if_exception_type(on), stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=first_wait_s, max=max_wait_s), reraise=True,
        before_sleep=lambda rs: log.warning("%s: %s; retry %d", what, rs.outcome.exception(), rs.attempt_number),
    )
