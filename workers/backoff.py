"""One exponential backoff, shared by publishing, committing and engine retries."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import Retrying, retry_if_exception, retry_if_exception_type, stop_after_attempt

log = logging.getLogger("workers.backoff")


def delay_s(attempt: int, first_s: float, max_s: float) -> float:
    """The wait after failed attempt number `attempt` (1-based): first_s, doubling, at most max_s."""
    return min(max_s, first_s * 2 ** (attempt - 1))


def retrying(
    what: str,
    on: type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool],
    attempts: int,
    first_wait_s: float = 0.2,
    max_wait_s: float = 5.0,
) -> Retrying:
    """Retries `on` (exception types, or a test of the exception) up to `attempts` tries in all,
    logging each retry; the last error is re-raised."""
    is_type = isinstance(on, tuple) or (isinstance(on, type) and issubclass(on, BaseException))
    return Retrying(
        retry=retry_if_exception_type(on) if is_type else retry_if_exception(on),  # type: ignore[arg-type]
        stop=stop_after_attempt(attempts),
        wait=lambda rs: delay_s(rs.attempt_number, first_wait_s, max_wait_s),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "%s: %s; retry %d", what, rs.outcome.exception() if rs.outcome else "?", rs.attempt_number
        ),
    )
