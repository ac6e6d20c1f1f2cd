"""EngineCheck: the engine's own admission check (tokenised length against the model's context,
sampling parameters vLLM would refuse). Runs last before the engine, so only requests that will
run are prepared."""

from __future__ import annotations

from workers.middleware import Middleware


class EngineCheck(Middleware):
    def before_batch(self, worker, batch) -> None:
        for m in batch:
            if m.done:
                continue
            try:
                rejection = worker.engine.check(m.request)
            except Exception as e:  # a tokenizer choking on one input must not stop the worker
                m.reject(
                    "unsupported",
                    f"the engine could not prepare this request: {type(e).__name__}: {e}"[:1000],
                    worker,
                )
                continue
            if rejection is not None:
                m.reject(rejection.reason, rejection.detail, worker)
