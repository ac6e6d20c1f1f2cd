"""The Grafana dashboard for an experiment: the workers' per-variant metrics, side by side."""

from __future__ import annotations

# (title, PromQL with $experiment, unit); every abq_ metric here is one the worker exports.
PANELS = [
    (
        "Requests/s by variant and outcome",
        'sum by (variant, outcome) (rate(abq_requests_total{experiment="$experiment"}[5m]))',
        "reqps",
    ),
    (
        "Error rate by variant",
        'sum by (variant) (rate(abq_requests_total{experiment="$experiment",outcome=~"error|expired"}[5m])) '
        '/ sum by (variant) (rate(abq_requests_total{experiment="$experiment"}[5m]))',
        "percentunit",
    ),
    (
        "End-to-end latency p95",
        'histogram_quantile(0.95, sum by (le, variant) (rate(abq_end_to_end_seconds_bucket{experiment="$experiment"}[5m])))',
        "s",
    ),
    (
        "Time to first token p50",
        'histogram_quantile(0.5, sum by (le, variant) (rate(abq_time_to_first_token_seconds_bucket{experiment="$experiment"}[5m])))',
        "s",
    ),
    (
        "Time per output token p50",
        'histogram_quantile(0.5, sum by (le, variant) (rate(abq_time_per_output_token_seconds_bucket{experiment="$experiment"}[5m])))',
        "s",
    ),
    (
        "Completion tokens/s",
        'sum by (variant) (rate(abq_tokens_total{experiment="$experiment",kind="completion"}[5m]))',
        "short",
    ),
    (
        "Queue wait p95",
        'histogram_quantile(0.95, sum by (le, variant) (rate(abq_queue_wait_seconds_bucket{experiment="$experiment"}[5m])))',
        "s",
    ),
    (
        "Dead letters/s by reason",
        'sum by (variant, reason) (rate(abq_dead_letters_total{experiment="$experiment"}[5m]))',
        "short",
    ),
    (
        "In flight and buffered",
        'sum by (variant) (abq_inflight_requests{experiment="$experiment"}) '
        'or sum by (variant, priority) (abq_buffered_requests{experiment="$experiment"})',
        "short",
    ),
    (
        "vLLM running / waiting",
        'sum by (variant) (abq_engine_running_requests{experiment="$experiment"}) '
        'or sum by (variant) (abq_engine_waiting_requests{experiment="$experiment"})',
        "short",
    ),
    ("KV-cache usage", 'max by (variant) (abq_kv_cache_usage_ratio{experiment="$experiment"})', "percentunit"),
    ("Start-up time", 'max by (variant) (abq_startup_seconds{experiment="$experiment"})', "s"),
]


def dashboard(experiment: str) -> dict:
    panels = []
    for i, (title, expr, unit) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": "A", "expr": expr, "legendFormat": "{{variant}} {{outcome}}{{reason}}{{priority}}"}
                ],
            }
        )
    return {
        "title": f"abqueue: {experiment}",
        "uid": f"abq-{experiment}"[:40],
        "schemaVersion": 39,
        "version": 1,
        "tags": ["abqueue"],
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "experiment", "type": "constant", "query": experiment, "hide": 2},
            ]
        },
        "panels": panels,
    }
