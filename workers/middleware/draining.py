"""Draining: SIGTERM (Kubernetes, KEDA scale-in) and SIGINT stop polling; the batch in hand is
finished, published and committed, the consumer leaves its group, and the process exits 0."""

from __future__ import annotations

import logging
import signal
import threading

from workers.middleware import Middleware

log = logging.getLogger(__name__)


class Draining(Middleware):
    def before_start(self, worker) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals only reach the main thread; embedded workers are stopped with worker.stop()

        def handle(signum, _frame):
            log.info("received %s: finishing the batch in hand, then leaving the group", signal.Signals(signum).name)
            worker.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
