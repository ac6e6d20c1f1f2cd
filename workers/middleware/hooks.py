"""Hooks: the variant's request and response hooks (`hooks:` in its config), run in the worker's
process around the engine, each call under the hook's time limit. A hook that raises, overruns
or returns the wrong thing gives its request an error answer and a dead letter (hook_failed)
naming the hook and what went wrong; the worker serves on. Per-hook time is a metric."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import Counter, Histogram

from schemas import ConfigError, InferenceRequest
from schemas.experiment import HookConfig
from workers.middleware import Middleware

log = logging.getLogger(__name__)

POOL = 4  # threads that run hooks; one a hook never returns from is given up, and replaced
HOOK_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


def load_hook(path: str) -> Callable[..., Any]:
    """The callable a `module:function` names, or a one-line ConfigError."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(
            f"hook {path}: cannot import {module} ({e}); is it installed in the worker's image?"
        ) from None
    except AttributeError:
        raise ConfigError(f"hook {path}: module {module} has no {name}") from None
    if not callable(fn):
        raise ConfigError(f"hook {path}: {name} is not a function")
    return fn


def _same_request(request: InferenceRequest) -> Callable[[Any], str | None]:
    """What a request hook must return: the request, changed or not, with the same id and variant
    (the engine picks a pool variant's adapter and template by the request's variant)."""

    def check(value: Any) -> str | None:
        same = isinstance(value, InferenceRequest) and (value.id, value.variant) == (request.id, request.variant)
        return None if same else "an InferenceRequest, same id and variant"

    return check


class _DaemonPool:
    """Threads that run hook calls and never hold up the process's exit: concurrent.futures joins
    its threads at exit, so one hook stuck for good would keep a stopping worker alive."""

    def __init__(self, size: int):
        self._size = size
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._work, name=f"abq-hook-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue  # given up on before it started
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the hook's own failure, handed to the caller
                future.set_exception(e)

    def shutdown(self) -> None:
        for _ in range(self._size):
            self._calls.put(None)


class Hooks(Middleware):
    def __init__(self, configs: dict[str, HookConfig]):
        """configs: variant -> its hooks (a pool's variants may each have their own)."""
        self.configs = configs
        self.request_hooks = {v: load_hook(c.request) for v, c in configs.items() if c.request}
        self.response_hooks = {v: load_hook(c.response) for v, c in configs.items() if c.response}
        self._pool = _DaemonPool(POOL)
        self._stuck: list[Future] = []  # calls that overran and are still running

    def before_start(self, worker) -> None:
        self._experiment = worker.experiment.name
        labels = ("experiment", "variant", "hook")
        self.seconds = Histogram(
            "abq_hook_seconds", "Time in each hook call", labels, buckets=HOOK_BUCKETS, registry=worker.registry
        )
        self.failures = Counter(
            "abq_hook_failures",
            "Hook calls that raised, overran or returned the wrong type",
            labels,
            registry=worker.registry,
        )

    def before_batch(self, worker, batch) -> None:
        if not self.request_hooks:
            return
        for m in batch:
            if m.done or m.request is None or (hook := self.request_hooks.get(m.variant)) is None:
                continue
            ok, value = self._call(m.variant, "request", hook, (m.request,), _same_request(m.request))
            if ok:
                m.request = value
            else:
                m.reject("hook_failed", f"request hook {self.configs[m.variant].request} {value}", worker)

    def after_engine(self, worker, finished) -> None:
        if not self.response_hooks:
            return
        for m in finished:
            c = m.completion
            hook = self.response_hooks.get(m.variant)
            if hook is None or m.done or m.request is None or c is None or c.error is not None:
                continue
            ok, value = self._call(
                m.variant, "response", hook, (m.request, list(c.outputs)),
                lambda v: None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of str",
            )  # fmt: skip
            if ok:
                m.completion = dataclasses.replace(c, outputs=value)
            else:
                m.reject("hook_failed", f"response hook {self.configs[m.variant].response} {value}", worker)

    def _call(
        self, variant: str, kind: str, fn: Callable[..., Any], args: tuple, expected: Callable[[Any], str | None]
    ) -> tuple[bool, Any]:
        """(True, what the hook returned) or (False, why it failed), within the time limit.
        expected(value): None where the value is what the hook must return, else what that is."""
        labels, limit = (self._experiment, variant, kind), self.configs[variant].timeout_s
        t0 = time.perf_counter()
        future = self._pool.submit(fn, *args)
        try:
            value = future.result(timeout=limit)
            if (want := expected(value)) is None:
                return True, value
            why = f"returned {type(value).__name__}, not {want}"
        except FutureTimeout:
            self._give_up(future)
            why = f"took longer than {limit:g}s"
        except Exception as e:
            why = f"raised {type(e).__name__}: {str(e)[:300]}"
        finally:
            self.seconds.labels(*labels).observe(time.perf_counter() - t0)
        self.failures.labels(*labels).inc()
        return False, why

    def _give_up(self, future: Future) -> None:
        """A thread cannot be stopped: leave it in its call, and once every pool thread is stuck so,
        start a fresh pool (the stuck threads are daemons: they never hold up the worker's exit)."""
        if future.cancel():
            return  # it never started: the pool was busy
        self._stuck = [f for f in self._stuck if not f.done()] + [future]
        if len(self._stuck) >= POOL:
            log.error("%d hook calls never returned; starting a fresh pool of hook threads", len(self._stuck))
            self._pool.shutdown()
            self._pool, self._stuck = _DaemonPool(POOL), []

    def after_stop(self, worker) -> None:
        self._pool.shutdown()
