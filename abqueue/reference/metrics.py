"""The metrics reference: what the worker and the gateway register with Prometheus, read from the
registries themselves (a worker on the stub transport, a gateway serving no experiment; neither
touches Kafka)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from abqueue.reference.markdown import cell


def _families(registry: CollectorRegistry) -> list[tuple[str, str, str, tuple[str, ...]]]:
    out = []
    collectors: list[Any] = list(registry._collector_to_names)
    for collector in collectors:
        # prometheus_client's metrics keep their label names in _labelnames; our LoopHistogram in labelnames.
        names = getattr(collector, "_labelnames", None)
        labels: tuple[str, ...] = tuple(collector.labelnames if names is None else names)
        for family in collector.describe():
            name = family.name + ("_total" if family.type == "counter" else "")
            out.append((name, family.type, family.documentation, labels))
    return sorted(out)


def worker_registry() -> CollectorRegistry:
    from schemas.experiment import ExperimentConfig, HookConfig, VariantConfig
    from workers.delivery import make_delivery
    from workers.engines.factory import make_engine
    from workers.middleware import emit_before
    from workers.streams import StreamPublisher
    from workers.transport.stub import StubBroker
    from workers.worker import Worker

    # A variant with hooks, so that the hooks' metrics are registered too.
    exp = ExperimentConfig(
        name="reference",
        variants=[VariantConfig(name="a", weight=100, hooks=HookConfig(request="abqueue.hooks:redact_pii"))],
    )
    broker: Any = StubBroker()  # its records are the stub's own type, which the Consumer protocol does not name
    strategy = make_delivery(
        "at-least-once", lambda transactional: broker.producer(), exp.response_topic, exp.deadletter_topic
    )
    streams = StreamPublisher(broker.producer(), "reference")  # so that the streaming metrics are registered
    engine = make_engine(exp.variant("a"))
    worker = Worker(exp, "a", engine, broker.consumer("g"), strategy, worker_id="reference", streams=streams)
    emit_before(worker.middleware, "before_start", worker)
    return worker.registry


def gateway_registry() -> CollectorRegistry:
    from abqueue.gateway.app import Gateway
    from abqueue.gateway.tenants import Tenants
    from abqueue.kafka import KafkaSettings

    gateway = Gateway(KafkaSettings(bootstrap_servers="unused:9092"), [], Tenants(), instance="reference")
    try:
        return gateway.registry
    finally:
        gateway.close()


def _table(registry: CollectorRegistry, common: tuple[str, ...]) -> list[str]:
    rows = ["| metric | type | labels | what |", "| --- | --- | --- | --- |"]
    for name, kind, doc, labels in _families(registry):
        extra = ", ".join(f"`{label}`" for label in labels if label not in common)
        rows.append(f"| `{name}` | {kind} | {extra} | {cell(doc)} |")
    return rows


def page() -> str:
    return (
        "\n".join(
            [
                "# Metrics",
                "",
                "## Worker",
                "",
                "`abq worker --metrics-port PORT` serves these on `/metrics` (beside `/healthz` and `/readyz`). Every one "
                "has the labels `experiment` and `variant` (a pool's worker labels engine-wide figures with the pool's "
                "name, per-request ones with the request's variant); the table lists the others. Histograms expose "
                "`_bucket`, `_sum` and `_count`. The engine gauges come from engines that report their scheduler "
                "(vLLM), and the hook metrics from variants with hooks.",
                "",
                *_table(worker_registry(), ("experiment", "variant")),
                "",
                "## Gateway",
                "",
                "`abq gateway` serves these on `/metrics`.",
                "",
                *_table(gateway_registry(), ()),
            ]
        )
        + "\n"
    )
