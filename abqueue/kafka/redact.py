"""Secrets kept out of kafka-python's logs.

kafka-python logs a client's whole configuration at DEBUG (the admin client's `Starting
KafkaAdminClient with configuration: {...}`), passwords included. The `abq` CLI keeps kafka-python
at WARNING, but an application that uses abqueue as a library and logs at DEBUG would write its
Kafka passwords into its logs. Every client abqueue builds registers its secrets here, and a filter
on every kafka-python logger replaces them in each record before any handler sees it.
"""

from __future__ import annotations

import logging
import threading

MASK = "********"

_secrets: set[str] = set()
_lock = threading.Lock()


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in _secrets):
            for s in sorted(_secrets, key=len, reverse=True):
                message = message.replace(s, MASK)
            record.msg, record.args = message, ()
        return True


_FILTER = RedactSecrets()


def redact(*secrets: str | None) -> None:
    """Never let these values reach a kafka-python log record (loggers created later included)."""
    with _lock:
        _secrets.update(s for s in secrets if s)
        # A filter applies to records logged on its own logger only, not on its children: put it
        # on each kafka-python logger there is (they are made at import, before any client is built).
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            ours = name == "kafka" or name.startswith("kafka.")
            if ours and isinstance(logger, logging.Logger) and _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
