"""`abq report`: per variant outcome, latency, tokens and feedback, and each variant against the
control with tests, intervals, lift, the sample size still needed, and an alpha-spending guard.

Comparisons use only requests assigned by the weights (and shadow copies, a random sample of their
source variant's traffic): override and pinned traffic is not randomised (beta testers are not a random sample), so it is counted per variant but kept out of
the tests. Per request: latency is enqueue to finish (what the caller waited), TTFT is the
engine's, tokens are completion tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, variance

import orjson

from abqueue.analysis import stats
from abqueue.errors import UsageError
from abqueue.kafka import KafkaSettings
from abqueue.kafka.reader import iter_to_end
from producers.assignment import weight_shares
from producers.progress import Progress
from schemas import ExperimentConfig, Feedback, InferenceResponse

log = logging.getLogger(__name__)

# Tested together and adjusted for it (--correction); guardrails are reported apart, unadjusted.
PRIMARY = ("latency_s", "latency_p50", "latency_p95", "ttft_s", "ttft_p50", "ttft_p95", "tokens", "thumbs_up_rate")
GUARDRAILS = ("error_rate",)
LABELS = {
    "latency_s": "mean latency",
    "latency_p50": "p50 latency",
    "latency_p95": "p95 latency",
    "ttft_s": "mean TTFT",
    "ttft_p50": "p50 TTFT",
    "ttft_p95": "p95 TTFT",
    "tokens": "output tokens",
    "thumbs_up_rate": "thumbs-up rate",
    "error_rate": "error rate",
}


@dataclass
class Sample:
    responses: list[InferenceResponse] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    versions: dict[int, ExperimentConfig] = field(default_factory=dict)  # live config versions still known


def read_topic(settings: KafkaSettings | None, topic: str, parse, timeout_s: float = 30.0, keep=None) -> list:
    """Every record of `topic` parsed as it is read (keep: which parsed ones to keep), with a
    progress line on stderr while a large topic is read."""
    assert settings is not None, "reading from topics needs Kafka settings"
    out = []
    bars: list[Progress] = []  # made once the topic proves large

    def progress(read: int, total: int) -> None:
        if total > PROGRESS_ABOVE_RECORDS:
            if not bars:
                bars.append(Progress(total, f"reading {topic}"))
            bars[0].update(read)

    for r in iter_to_end(settings, topic, timeout_s, progress):
        try:
            item = parse(r.value)
        except ValueError:
            continue  # not ours to judge here; the worker dead-letters bad input
        if keep is None or keep(item):
            out.append(item)
    if bars:
        bars[0].finish(bars[0].total, f"{len(out)} kept")
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
PROGRESS_ABOVE_RECORDS = 20_000


@dataclass
class Window:
    """Which responses a report covers: enqueued in [since, until) (Unix seconds), of one config version."""

    since: float | None = None
    until: float | None = None
    config_version: int | None = None

    def __call__(self, r: InferenceResponse) -> bool:
        t = r.timings.enqueued
        return (
            (self.since is None or t >= self.since)
            and (self.until is None or t < self.until)
            and (self.config_version is None or r.config_version == self.config_version)
        )


def load(
    settings: KafkaSettings | None,
    exp: ExperimentConfig,
    responses: Path | None,
    feedback: Path | None,
    window: Window | None = None,
) -> Sample:
    keep = window or Window()
    if responses is not None:
        resp = [r for r in read_jsonl(responses, InferenceResponse) if keep(r)]
    else:
        resp = read_topic(settings, exp.response_topic, InferenceResponse.model_validate_json, keep=keep)
        if any(v.shadow_of for v in exp.variants):
            resp += read_topic(settings, exp.shadow_response_topic, InferenceResponse.model_validate_json, keep=keep)
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
    return Sample(list(first.values()), [f for f in fb if f.experiment == exp.name], _versions(settings, exp))


def _versions(settings: KafkaSettings | None, exp: ExperimentConfig) -> dict[int, ExperimentConfig]:
    """The experiment's live config versions still in the config topic (their weights, for the
    sample-ratio check); none without Kafka or a config topic."""
    if settings is None:
        return {}
    from abqueue.control import live_config

    try:
        return {r.version: r.experiment for r in live_config.read_all(settings, exp.name)}
    except Exception as e:  # no config topic, or not allowed to read it: the file's weights serve
        log.info("no live config versions of %s to check the sample ratio against (%s)", exp.name, e)
        return {}


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


def _means(
    c: list[float], t: list[float], alpha: float, mde: float, spent: float, covariate: tuple | None = None
) -> dict:
    """covariate: (control's, treatment's) pre-treatment values, one per value of c and t; where it
    removes at least 1% of the variance (CUPED), the test and interval are the adjusted ones."""
    w = stats.welch(c, t, alpha)
    lift, lift_ci = (
        stats.relative_lift(fmean(c), variance(c), len(c), fmean(t), variance(t), len(t), alpha)
        if len(c) > 1 and len(t) > 1
        else (float("nan"), (float("nan"), float("nan")))
    )
    needed = stats.sample_size_means(math.sqrt(variance(c)), mde * fmean(c), alpha) if len(c) > 1 else 0
    out = {
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
    if covariate is not None:
        adj = stats.cuped(c, covariate[0], t, covariate[1], alpha)
        used = adj["variance_reduction"] >= stats.CUPED_MIN_REDUCTION
        out["cuped"] = {"theta": adj["theta"], "variance_reduction": adj["variance_reduction"], "used": used}
        if used:
            out["unadjusted_p_value"], out["unadjusted_ci"] = out["p_value"], out["ci"]
            out["p_value"], out["ci"], out["difference"] = adj["p_value"], adj["ci"], adj["difference"]
            out["significant"] = bool(adj["p_value"] < spent) if not math.isnan(adj["p_value"]) else False
    return out


def _covariate(control: list[InferenceResponse], treatment: list[InferenceResponse]):
    """The pre-treatment covariate for CUPED, per response: the prompt's characters; or, for older
    responses without them, its tokens where both variants run the same model (another model's
    tokenizer would count the same prompt differently, and the adjustment would then be biased)."""
    both = control + treatment
    if both and all(r.usage.prompt_chars is not None for r in both):
        return lambda rs: [float(r.usage.prompt_chars or 0) for r in rs]
    if both and len({r.model for r in both}) == 1:
        return lambda rs: [float(r.usage.prompt_tokens) for r in rs]
    return None


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


def sample_ratio_checks(
    rs: list[InferenceResponse], exp: ExperimentConfig, versions: dict[int, ExperimentConfig]
) -> list[dict]:
    """The sample-ratio check per config version: units (hashed routing keys; requests where a
    response has none) assigned by the weights, per variant, against the shares those weights give
    (overrides, pins and shadows are not assigned by the weights and take no part). A version whose
    weights are not known (compacted away, or a report from a file) is listed without a test:
    judging it by the config file's weights, which may be another version's, would raise false
    alarms. Traffic without a version (a producer that does not follow the live config) is judged
    against the config file's weights."""
    units: dict[int | None, dict[str, set[str]]] = {}
    for r in rs:
        if (r.assigned_by or "weights") == "weights":
            units.setdefault(r.config_version, {}).setdefault(r.variant, set()).add(r.unit or r.request_id)
    out = []
    for version in sorted(units, key=lambda v: (v is not None, v or 0)):
        observed = {name: len(u) for name, u in units[version].items()}
        config = exp if version is None else versions.get(version)
        check: dict = {"config_version": version, "observed": observed}
        if config is None:
            out.append({**check, "note": f"the weights of config version {version} are not known here (read the "
                        "responses from Kafka, where the config topic keeps them)"})  # fmt: skip
            continue
        shares = weight_shares(config)
        stray = {name: n for name, n in observed.items() if shares.get(name, 0) == 0}
        result = stats.sample_ratio(observed, shares)
        check["expected"] = result.expected if result else {}
        check["chi2"] = result.chi2 if result else float("nan")
        check["p_value"] = 0.0 if stray else (result.p_value if result else float("nan"))
        check["mismatch"] = bool(stray) or bool(result and result.mismatch)
        if stray:
            check["note"] = f"weights-assigned traffic in variants the weights give nothing: {stray}"
        out.append(check)
    return out


def report(
    sample: Sample,
    exp: ExperimentConfig,
    alpha: float = 0.05,
    mde: float = 0.1,
    planned_n: int | None = None,
    correction: str = "holm",
) -> dict:
    fb = {f.request_id: f for f in sorted(sample.feedback, key=lambda f: f.created_at)}  # the latest feedback counts
    by_variant: dict[str, list[InferenceResponse]] = {v.name: [] for v in exp.variants}
    for r in sample.responses:
        by_variant.setdefault(r.variant, []).append(r)
    srm = sample_ratio_checks(sample.responses, exp, sample.versions)
    out: dict = {
        "experiment": exp.name,
        "control": exp.control_variant,
        "alpha": alpha,
        "mde": mde,
        "correction": correction,
        "srm": srm,
        "srm_mismatch": any(c.get("mismatch") for c in srm),
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
        lat_c, lat_t = [_latency(r) for r in c_ok], [_latency(r) for r in t_ok]
        with_ttft_c = [r for r in c_ok if r.timings.ttft_s is not None]
        with_ttft_t = [r for r in t_ok if r.timings.ttft_s is not None]
        ttft_c = [r.timings.ttft_s for r in with_ttft_c if r.timings.ttft_s is not None]
        ttft_t = [r.timings.ttft_s for r in with_ttft_t if r.timings.ttft_s is not None]
        x = _covariate(c_ok, t_ok)
        x_ok = (x(c_ok), x(t_ok)) if x else None
        x_ttft = (x(with_ttft_c), x(with_ttft_t)) if x else None
        lat_q, ttft_q = (
            stats.quantile_diffs(lat_c, lat_t, alpha=alpha),
            stats.quantile_diffs(ttft_c, ttft_t, alpha=alpha),
        )
        out["comparisons"][name] = {
            "n_control": len(control),
            "n_treatment": len(rs),
            "planned_n_per_group": plan,
            "information_fraction": min(1.0, information),
            "alpha_spent": spent,
            "latency_s": _means(lat_c, lat_t, alpha, mde, spent, x_ok),
            "ttft_s": _means(ttft_c, ttft_t, alpha, mde, spent, x_ttft),
            "latency_p50": lat_q[50],
            "latency_p95": lat_q[95],
            "ttft_p50": ttft_q[50],
            "ttft_p95": ttft_q[95],
            "tokens": _means(
                [float(r.usage.completion_tokens) for r in c_ok],
                [float(r.usage.completion_tokens) for r in t_ok],
                alpha,
                mde,
                spent,
                x_ok,
            ),
            "error_rate": _proportions(err(control), len(control), err(rs), len(rs), alpha, mde, spent),
            "thumbs_up_rate": _proportions(up(control), rated(control), up(rs), rated(rs), alpha, mde, spent),
        }
    _judge(out, correction)
    out["summary"] = summary_lines(out)
    return out


def _judge(out: dict, correction: str) -> None:
    """Adjusts the primary metrics' p-values across every metric and variant together (Holm or
    Benjamini-Hochberg), then calls each significant against the alpha spent so far; guardrails are
    judged on their own p-values."""
    cells = [(c, m) for c in out["comparisons"].values() for m in PRIMARY]
    adjusted = stats.adjust([c[m]["p_value"] for c, m in cells], correction, out["alpha"])
    for (c, m), p in zip(cells, adjusted, strict=True):
        c[m]["p_adjusted"] = p
    for c in out["comparisons"].values():
        for m in (*PRIMARY, *GUARDRAILS):
            p = c[m].get("p_adjusted", c[m]["p_value"])
            c[m]["significant"] = bool(p < c["alpha_spent"]) if not math.isnan(p) else False


def summary_lines(out: dict) -> list[str]:
    """What the data supports, in words: the sample-ratio check first (a mismatch makes every
    comparison below suspect), then per variant its significant differences and its guardrails."""
    lines = []
    bad = [c for c in out["srm"] if c.get("mismatch")]
    if bad:
        for c in bad:
            version = "without a config version" if c["config_version"] is None else f"config v{c['config_version']}"
            lines.append(
                f"SRM: MISMATCH ({version}: observed {c['observed']}, expected "
                f"{ {k: round(v) for k, v in c.get('expected', {}).items()} }, p={c['p_value']:.2g}). The traffic does "
                "not split as the weights say: suspect a broken assignment, a variant that crashes or a worker that "
                "drops requests before trusting any result below"
            )
    else:
        tested = [c for c in out["srm"] if "p_value" in c and c["p_value"] == c["p_value"]]
        untested = [c["note"] for c in out["srm"] if "note" in c and "p_value" not in c]
        if tested:
            lines.append(f"SRM: none (min p={min(c['p_value'] for c in tested):.2g})")
        else:
            lines.append("SRM: not checked: " + (untested[0] if untested else "no traffic assigned by the weights"))
    adjusted = {"holm": "after Holm", "bh": "after Benjamini-Hochberg", "none": "unadjusted"}[out["correction"]]
    level = round(100 * (1 - out["alpha"]))
    for name, c in out["comparisons"].items():
        parts = []
        for m in PRIMARY:
            r = c[m]
            if r["significant"]:
                parts.append(f"{LABELS[m]} {_pct(r['lift'])} ({level}% CI {_pct(r['lift_ci'][0])} to "
                             f"{_pct(r['lift_ci'][1])}), significant {adjusted}")  # fmt: skip
        if not parts:
            parts.append("no detectable difference in latency, TTFT, output tokens or thumbs-up rate (yet)")
        for m in GUARDRAILS:
            r = c[m]
            parts.append(
                f"{LABELS[m]} {_pct(r['difference'])} points, significant"
                if r["significant"]
                else f"{LABELS[m]} no detectable difference"
            )
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


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
    lines = [*result["summary"], ""]
    lines += [
        f"experiment {result['experiment']} (control: {result['control']})",
        f"{'':<20}" + "".join(f"{n:>14}" for n in names),
    ]
    for k in rows:
        lines.append(f"{k:<20}" + "".join(_fmt(result["variants"][n][k], 14) for n in names))
    for check in result["srm"]:
        version = "no version" if check["config_version"] is None else f"v{check['config_version']}"
        expected = {k: round(v) for k, v in check.get("expected", {}).items()}
        verdict = "MISMATCH" if check.get("mismatch") else "ok"
        lines.append(
            f"sample ratio ({version}): units {check['observed']} expected {expected} "
            f"p {_fmt(check.get('p_value'), 0).strip()} {verdict}" + (f"; {check['note']}" if "note" in check else "")
        )
    adjusted = {"holm": "Holm", "bh": "BH", "none": "unadjusted"}[result["correction"]]
    for name, c in result["comparisons"].items():
        lines.append(
            f"\n{name} vs {result['control']} (randomised traffic: {c['n_treatment']} vs {c['n_control']}; "
            f"{100 * c['information_fraction']:.0f}% of the planned {c['planned_n_per_group']} per group; "
            f"alpha spent {c['alpha_spent']:.4f}; primary metrics {adjusted})"
        )
        for metric in (*PRIMARY, *GUARDRAILS):
            m = c[metric]
            verdict = "significant" if m["significant"] else "not significant (yet)"
            p_adj = (
                f" (adj {_fmt(m['p_adjusted'], 0).strip()})"
                if "p_adjusted" in m and result["correction"] != "none"
                else ""
            )
            needed = f"; n needed {m['n_needed_per_group']}" if "n_needed_per_group" in m else ""
            if m.get("cuped", {}).get("used"):
                needed += f"; CUPED on prompt length: variance -{100 * m['cuped']['variance_reduction']:.0f}%"
            lines.append(
                f"  {metric:<15} diff {_fmt(m['difference'], 0).strip():>10}  CI [{_fmt(m['ci'][0], 0).strip()}, "
                f"{_fmt(m['ci'][1], 0).strip()}]  lift {_pct(m['lift'])} [{_pct(m['lift_ci'][0])}, {_pct(m['lift_ci'][1])}]"
                f"  p {_fmt(m['p_value'], 0).strip()}{p_adj}  {verdict}{needed}"
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
