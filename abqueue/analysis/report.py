"""`abq report`: per variant outcome, latency, tokens and feedback, and each variant against the
control with tests, intervals, lift, the sample size still needed, and an alpha-spending guard.

Comparisons use only requests assigned by the weights (and shadow copies, a random sample of their
source variant's traffic): override and pinned traffic is not randomised (beta testers are not a random sample), so it is counted per variant but kept out of
the tests. Per request: latency is enqueue to finish (what the caller waited), TTFT is the
engine's, tokens are completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, variance

import orjson

from abqueue.analysis import stats
from abqueue.errors import UsageError
from abqueue.kafka import KafkaSettings
from abqueue.kafka.reader import read_to_end
from producers.progress import Progress
from schemas import ExperimentConfig, Feedback, InferenceResponse


@dataclass
class Sample:
    responses: list[InferenceResponse] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)


def read_topic(settings: KafkaSettings | None, topic: str, parse, timeout_s: float = 30.0) -> list:
    assert settings is not None, "reading from topics needs Kafka settings"
    out = []
    for r in read_to_end(settings, topic, timeout_s):
        try:
            out.append(parse(r.value))
        except ValueError:
            continue  # not ours to judge here; the worker dead-letters bad input
    return out


def read_jsonl(path: Path, model, defaults: dict | None = None) -> list:
    """Every line of `path` as `model` (`defaults` fill fields a line leaves out, e.g. the experiment
    of hand-written feedback). Responses may also be `abq batch` output in OpenAI's format, which
    keeps abqueue's response under `abq`. Long files show progress on stderr."""
    from producers.openai_batch import ABQ_KEY

    out = []
    size = max(1, path.stat().st_size)
    progress = Progress(size, f"reading {path.name}") if size > PROGRESS_ABOVE_BYTES else None
    done = 0
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            done += len(line)
            if progress and n % 10_000 == 0:
                progress.update(done)
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line) if model is InferenceResponse and b'"custom_id"' in line else None
                if obj is None and defaults:
                    out.append(model.model_validate({**defaults, **orjson.loads(line)}))
                elif obj is None:
                    out.append(model.model_validate_json(line))
                elif ABQ_KEY in obj:
                    out.append(model.model_validate(obj[ABQ_KEY]))
            except ValueError as e:  # orjson's and pydantic's errors both are
                raise UsageError(f"{path}:{n} is not {model.__name__} JSON: {str(e).splitlines()[0]}") from None
            if obj is not None and ABQ_KEY not in obj:
                raise UsageError(
                    f"{path}:{n} is an OpenAI Batch output line without abqueue's response (key {ABQ_KEY!r}); "
                    "rerun `abq batch` with this version to analyse its results"
                )
    if progress:
        progress.finish(size, f"{len(out)} records")
    return out


PROGRESS_ABOVE_BYTES = 20_000_000  # about 20k responses: reading takes seconds from here


def load(
    settings: KafkaSettings | None, exp: ExperimentConfig, responses: Path | None, feedback: Path | None
) -> Sample:
    if responses is not None:
        resp = read_jsonl(responses, InferenceResponse)
    else:
        resp = read_topic(settings, exp.response_topic, InferenceResponse.model_validate_json)
        if any(v.shadow_of for v in exp.variants):
            resp += read_topic(settings, exp.shadow_response_topic, InferenceResponse.model_validate_json)
    if feedback is not None:
        fb = read_jsonl(feedback, Feedback, defaults={"experiment": exp.name})
    elif responses is None:
        fb = read_topic(settings, exp.feedback_topic, Feedback.model_validate_json)
    else:
        fb = []
    first: dict[tuple[str, str], InferenceResponse] = {}
    for r in resp:
        if r.experiment == exp.name and r.counts_for_variant:
            # At-least-once delivery: the first response per request counts (per variant: a shadow
            # answers the same request id).
            first.setdefault((r.request_id, r.variant), r)
    return Sample(list(first.values()), [f for f in fb if f.experiment == exp.name])


def _latency(r: InferenceResponse) -> float:
    return r.timings.finished - r.timings.enqueued


def summarise(rs: list[InferenceResponse], fb: dict[str, Feedback]) -> dict:
    n = len(rs)
    errors = sum(1 for r in rs if r.error and r.error.code != "expired")
    expired = sum(1 for r in rs if r.error and r.error.code == "expired")
    ok = [r for r in rs if r.ok]
    lat = [_latency(r) for r in ok]
    ttft = [r.timings.ttft_s for r in ok if r.timings.ttft_s is not None]
    tokens = [r.usage.completion_tokens for r in ok]
    engine_s = sum(r.timings.finished - r.timings.started for r in ok if r.timings.started)
    thumbs = [fb[r.request_id].thumbs for r in rs if r.request_id in fb and fb[r.request_id].thumbs]
    scores = [s for r in rs if r.request_id in fb and (s := fb[r.request_id].score) is not None]
    return {
        "count": n,
        "by_assignment": _count_by(rs),
        "error_rate": errors / n if n else float("nan"),
        "expired_rate": expired / n if n else float("nan"),
        "latency_s_p50": stats.percentile(lat, 50),
        "latency_s_p95": stats.percentile(lat, 95),
        "latency_s_p99": stats.percentile(lat, 99),
        "latency_s_mean": fmean(lat) if lat else float("nan"),
        "ttft_s_p50": stats.percentile(ttft, 50),
        "ttft_s_mean": fmean(ttft) if ttft else float("nan"),
        "tokens_per_request": fmean(tokens) if tokens else float("nan"),
        "tokens_per_s": sum(tokens) / engine_s if engine_s else float("nan"),
        "feedback_count": len(thumbs) + len(scores),
        "thumbs_up_rate": thumbs.count("up") / len(thumbs) if thumbs else float("nan"),
        "score_mean": fmean(scores) if scores else float("nan"),
    }


def _count_by(rs) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rs:
        key = r.assigned_by or "weights"
        out[key] = out.get(key, 0) + 1
    return out


def _means(c: list[float], t: list[float], alpha: float, mde: float, spent: float) -> dict:
    w = stats.welch(c, t, alpha)
    lift, lift_ci = (
        stats.relative_lift(fmean(c), variance(c), len(c), fmean(t), variance(t), len(t), alpha)
        if len(c) > 1 and len(t) > 1
        else (float("nan"), (float("nan"), float("nan")))
    )
    needed = stats.sample_size_means(math.sqrt(variance(c)), mde * fmean(c), alpha) if len(c) > 1 else 0
    return {
        "control_mean": fmean(c) if c else float("nan"),
        "treatment_mean": fmean(t) if t else float("nan"),
        "difference": w.difference,
        "welch_t": w.statistic,
        "welch_df": w.df,
        "p_value": w.p_value,
        "ci": list(w.ci),
        "bootstrap_ci": list(stats.bootstrap_mean_diff(c, t, alpha)),
        "lift": lift,
        "lift_ci": list(lift_ci),
        "n_needed_per_group": needed,
        "significant": bool(w.p_value < spent) if not math.isnan(w.p_value) else False,
    }


def _proportions(x1: int, n1: int, x2: int, n2: int, alpha: float, mde: float, spent: float) -> dict:
    z = stats.two_proportions(x1, n1, x2, n2, alpha)
    p1, p2 = (x1 / n1 if n1 else float("nan")), (x2 / n2 if n2 else float("nan"))
    lift, lift_ci = (
        stats.relative_lift(p1, p1 * (1 - p1), n1, p2, p2 * (1 - p2), n2, alpha)
        if n1 and n2 and p1
        else (float("nan"), (float("nan"), float("nan")))
    )
    target = min(1.0, p1 * (1 + mde)) if n1 and p1 else (mde if n1 else float("nan"))
    needed = stats.sample_size_proportions(p1, target, alpha) if n1 and not math.isnan(target) else 0
    return {
        "control_rate": p1,
        "treatment_rate": p2,
        "difference": z.difference,
        "z": z.statistic,
        "p_value": z.p_value,
        "ci": list(z.ci),
        "lift": lift,
        "lift_ci": list(lift_ci),
        "n_needed_per_group": needed,
        "significant": bool(z.p_value < spent) if not math.isnan(z.p_value) else False,
    }


def report(
    sample: Sample, exp: ExperimentConfig, alpha: float = 0.05, mde: float = 0.1, planned_n: int | None = None
) -> dict:
    fb = {f.request_id: f for f in sorted(sample.feedback, key=lambda f: f.created_at)}  # the latest feedback counts
    by_variant: dict[str, list[InferenceResponse]] = {v.name: [] for v in exp.variants}
    for r in sample.responses:
        by_variant.setdefault(r.variant, []).append(r)
    out: dict = {
        "experiment": exp.name,
        "control": exp.control_variant,
        "alpha": alpha,
        "mde": mde,
        "variants": {name: summarise(rs, fb) for name, rs in by_variant.items()},
        "comparisons": {},
    }
    # Shadow copies are a random sample (by key) of their source variant's traffic, so they compare too.
    randomised = {
        name: [
            r for r in rs if (r.assigned_by or "weights") == "weights" or (r.assigned_by or "").startswith("shadow:")
        ]
        for name, rs in by_variant.items()
    }
    control = randomised.get(exp.control_variant, [])
    for name, rs in randomised.items():
        if name == exp.control_variant:
            continue
        c_ok, t_ok = [r for r in control if r.ok], [r for r in rs if r.ok]
        # The guard: significance is judged against the alpha spent so far (O'Brien-Fleming), the
        # information fraction being the smaller group over the planned per-group size.
        plan = (
            planned_n
            or stats.sample_size_means(
                math.sqrt(variance([_latency(r) for r in c_ok])) if len(c_ok) > 1 else 0,
                mde * fmean([_latency(r) for r in c_ok]) if c_ok else 0,
                alpha,
            )
            or 1
        )
        information = min(len(control), len(rs)) / plan
        spent = stats.obrien_fleming_alpha(information, alpha)
        err = lambda g: sum(1 for r in g if r.error and r.error.code != "expired")  # noqa: E731
        up = lambda g: sum(1 for r in g if r.request_id in fb and fb[r.request_id].thumbs == "up")  # noqa: E731
        rated = lambda g: sum(1 for r in g if r.request_id in fb and fb[r.request_id].thumbs)  # noqa: E731
        out["comparisons"][name] = {
            "n_control": len(control),
            "n_treatment": len(rs),
            "planned_n_per_group": plan,
            "information_fraction": min(1.0, information),
            "alpha_spent": spent,
            "latency_s": _means([_latency(r) for r in c_ok], [_latency(r) for r in t_ok], alpha, mde, spent),
            "tokens": _means(
                [float(r.usage.completion_tokens) for r in c_ok],
                [float(r.usage.completion_tokens) for r in t_ok],
                alpha,
                mde,
                spent,
            ),
            "error_rate": _proportions(err(control), len(control), err(rs), len(rs), alpha, mde, spent),
            "thumbs_up_rate": _proportions(up(control), rated(control), up(rs), rated(rs), alpha, mde, spent),
        }
    return out


def to_json(result: dict) -> str:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return orjson.dumps(clean(result), option=orjson.OPT_INDENT_2).decode()


def to_table(result: dict) -> str:
    names = list(result["variants"])
    rows = [
        "count",
        "error_rate",
        "expired_rate",
        "latency_s_p50",
        "latency_s_p95",
        "latency_s_p99",
        "ttft_s_p50",
        "tokens_per_request",
        "tokens_per_s",
        "feedback_count",
        "thumbs_up_rate",
        "score_mean",
    ]
    lines = [
        f"experiment {result['experiment']} (control: {result['control']})",
        f"{'':<20}" + "".join(f"{n:>14}" for n in names),
    ]
    for k in rows:
        lines.append(f"{k:<20}" + "".join(_fmt(result["variants"][n][k], 14) for n in names))
    for name, c in result["comparisons"].items():
        lines.append(
            f"\n{name} vs {result['control']} (randomised traffic: {c['n_treatment']} vs {c['n_control']}; "
            f"{100 * c['information_fraction']:.0f}% of the planned {c['planned_n_per_group']} per group; "
            f"alpha spent {c['alpha_spent']:.4f})"
        )
        for metric in ("latency_s", "tokens", "error_rate", "thumbs_up_rate"):
            m = c[metric]
            verdict = "significant" if m["significant"] else "not significant (yet)"
            lines.append(
                f"  {metric:<15} diff {_fmt(m['difference'], 0).strip():>10}  CI [{_fmt(m['ci'][0], 0).strip()}, "
                f"{_fmt(m['ci'][1], 0).strip()}]  lift {_pct(m['lift'])} [{_pct(m['lift_ci'][0])}, {_pct(m['lift_ci'][1])}]"
                f"  p {_fmt(m['p_value'], 0).strip()}  {verdict}; n needed {m['n_needed_per_group']}"
            )
    return "\n".join(lines)


def _fmt(x, width: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    if isinstance(x, dict):
        return f"{' '.join(f'{k}:{v}' for k, v in x.items()):>{width}}"
    return f"{x:>{width}.4g}" if isinstance(x, float) else f"{x:>{width}}"


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"
