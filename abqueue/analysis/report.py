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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from abqueue.analysis import stats
from abqueue.analysis.tally import Column, Group, Tally, endpoint_of, marks
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


def read_topic(settings: KafkaSettings | None, topic: str, parse, timeout_s: float = 30.0) -> Iterator:
    """Every record of `topic` parsed, as it is read, with a progress line on stderr while a large
    topic is read."""
    assert settings is not None, "reading from topics needs Kafka settings"
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
        yield item
    if bars:
        bars[0].finish(bars[0].total, "read")


def read_jsonl(path: Path, model, defaults: dict | None = None) -> Iterator:
    """Every line of `path` as `model`, as it is read (`defaults` fill fields a line leaves out, e.g. the experiment
    of hand-written feedback). Responses may also be `abq batch` output in OpenAI's format, which
    keeps abqueue's response under `abq`. Long files show progress on stderr."""
    from producers.openai_batch import ABQ_KEY

    if not path.exists():
        raise UsageError(f"{path} does not exist; check --input/--feedback")
    size, records = max(1, path.stat().st_size), 0
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
                    item = model.model_validate({**defaults, **orjson.loads(line)})
                elif obj is None:
                    item = model.model_validate_json(line)
                elif ABQ_KEY in obj:
                    item = model.model_validate(obj[ABQ_KEY])
            except ValueError as e:  # orjson's and pydantic's errors both are
                raise UsageError(f"{path}:{n} is not {model.__name__} JSON: {str(e).splitlines()[0]}") from None
            if obj is not None and ABQ_KEY not in obj:
                raise UsageError(
                    f"{path}:{n} is an OpenAI Batch output line without abqueue's response (key {ABQ_KEY!r}); "
                    "rerun `abq batch` with this version to analyse its results"
                )
            records += 1
            yield item
    if progress:
        progress.finish(size, f"{records} records")


PROGRESS_ABOVE_BYTES = 20_000_000  # about 20k responses: reading takes seconds from here
PROGRESS_ABOVE_RECORDS = 20_000


@dataclass
class Window:
    """Which responses a report covers: enqueued in [since, until) (Unix seconds), of one config version."""

    since: float | None = None
    until: float | None = None
    config_version: int | None = None
    endpoint: str | None = None  # one endpoint's answers (tally.NO_BODY: requests without a body)

    def __call__(self, r: InferenceResponse) -> bool:
        t = r.timings.enqueued
        return (
            (self.since is None or t >= self.since)
            and (self.until is None or t < self.until)
            and (self.config_version is None or r.config_version == self.config_version)
            and (self.endpoint is None or endpoint_of(r) == self.endpoint)
        )


def responses(
    settings: KafkaSettings | None,
    exp: ExperimentConfig,
    path: Path | None,
    window: Window | None = None,
    left_out: Callable[[InferenceResponse], None] | None = None,
) -> Iterator[InferenceResponse]:
    """The experiment's responses that count for their variant, in `window`, as they are read: from
    the file at `path`, else from the responses topic (and the shadow responses topic where a
    variant shadows another). left_out(r): each response in the window that does not count."""
    keep = window or Window()
    if path is not None:
        sources: list[Iterable[InferenceResponse]] = [read_jsonl(path, InferenceResponse)]
    else:
        topics = [exp.response_topic] + ([exp.shadow_response_topic] if any(v.shadow_of for v in exp.variants) else [])
        sources = [read_topic(settings, t, InferenceResponse.model_validate_json) for t in topics]
    for source in sources:
        for r in source:
            if r.experiment != exp.name or not keep(r):
                continue
            if r.counts_for_variant:
                yield r
            elif left_out is not None:
                left_out(r)


def load(
    settings: KafkaSettings | None,
    exp: ExperimentConfig,
    path: Path | None,
    feedback: Path | None,
    window: Window | None = None,
) -> Tally:
    """The report's tally of the experiment's responses (from the file at `path`, else the topics),
    joined to their feedback (from the file, else the feedback topic where responses come from it)."""
    if feedback is not None:
        fb: Iterable[Feedback] = read_jsonl(feedback, Feedback, defaults={"experiment": exp.name})
    elif path is None:
        fb = read_topic(settings, exp.feedback_topic, Feedback.model_validate_json)
    else:
        fb = []
    tally = Tally(marks(f for f in fb if f.experiment == exp.name), _versions(settings, exp))
    for r in responses(settings, exp, path, window, left_out=tally.left_out):
        tally.add(r)
    return tally.done()


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


def summarise(g: Group) -> dict:
    n = g.count
    nan = float("nan")
    return {
        "count": n,
        "by_assignment": dict(g.by_assignment),
        "error_rate": g.errors / n if n else nan,
        "expired_rate": g.expired / n if n else nan,
        "latency_s_p50": g.latency.percentile(50),
        "latency_s_p95": g.latency.percentile(95),
        "latency_s_p99": g.latency.percentile(99),
        "latency_s_mean": g.latency.mean,
        "ttft_s_p50": g.ttft.percentile(50),
        "ttft_s_mean": g.ttft.mean,
        "tokens_per_request": g.tokens.mean,
        "tokens_per_s": g.tokens_sum / g.engine_s if g.engine_s else nan,
        "mean_token_logprob": g.logprob_sum / g.logprob_tokens if g.logprob_tokens else nan,
        "feedback_count": g.rated + g.scores,
        "thumbs_up_rate": g.thumbs_up / g.rated if g.rated else nan,
        "score_mean": g.score_sum / g.scores if g.scores else nan,
    }


def _means(c: Column, t: Column, alpha: float, mde: float, spent: float, covariate: str | None = None) -> dict:
    """covariate: which of the columns' moments hold the pre-treatment covariate ("by_chars" or
    "by_tokens"); where it removes at least 1% of the variance (CUPED), the test and interval are
    the adjusted ones."""
    cs, ts = c.summary(), t.summary()
    w = stats.welch(cs, ts, alpha)
    lift, lift_ci = (
        stats.relative_lift(cs.mean, cs.variance, cs.count, ts.mean, ts.variance, ts.count, alpha)
        if cs.count > 1 and ts.count > 1
        else (float("nan"), (float("nan"), float("nan")))
    )
    needed = stats.sample_size_means(math.sqrt(cs.variance), mde * cs.mean, alpha) if cs.count > 1 else 0
    out = {
        "control_mean": cs.mean,
        "treatment_mean": ts.mean,
        "difference": w.difference,
        "welch_t": w.statistic,
        "welch_df": w.df,
        "p_value": w.p_value,
        "ci": list(w.ci),
        "bootstrap_ci": list(stats.bootstrap_mean_diff(cs, ts, alpha)),
        "lift": lift,
        "lift_ci": list(lift_ci),
        "n_needed_per_group": needed,
        "significant": bool(w.p_value < spent) if not math.isnan(w.p_value) else False,
    }
    if covariate is not None:
        adj = stats.cuped_from(getattr(c, covariate), getattr(t, covariate), alpha)
        used = adj["variance_reduction"] >= stats.CUPED_MIN_REDUCTION
        out["cuped"] = {"theta": adj["theta"], "variance_reduction": adj["variance_reduction"], "used": used}
        if used:
            # Every estimate on the line is the adjusted one: a lift left unadjusted beside an adjusted
            # difference told two stories (the forest plot drew the unadjusted one as significant).
            out["unadjusted_p_value"], out["unadjusted_ci"] = out["p_value"], out["ci"]
            out["unadjusted_lift"], out["unadjusted_lift_ci"] = out["lift"], out["lift_ci"]
            out["p_value"], out["ci"], out["difference"] = adj["p_value"], adj["ci"], adj["difference"]
            lift, lift_ci = stats.lift_of_difference(
                cs.mean, cs.variance, cs.count, adj["difference"], adj["ci"], alpha
            )
            out["lift"], out["lift_ci"] = lift, list(lift_ci)
            out["significant"] = bool(adj["p_value"] < spent) if not math.isnan(adj["p_value"]) else False
    return out


def _covariate(control: Group, treatment: Group) -> str | None:
    """The pre-treatment covariate for CUPED: the prompt's characters; or, for older responses
    without them, its tokens where both variants run the same model (another model's tokenizer would
    count the same prompt differently, and the adjustment would then be biased)."""
    if not control.latency.count or not treatment.latency.count:
        return None
    if not control.without_chars and not treatment.without_chars:
        return "by_chars"
    if len(control.models | treatment.models) == 1:
        return "by_tokens"
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


def sample_ratio_checks(tally: Tally, exp: ExperimentConfig) -> list[dict]:
    """The sample-ratio check per config version: units (hashed routing keys; requests where a
    response has none) assigned by the weights, per variant, against the shares those weights give
    (overrides, pins and shadows are not assigned by the weights and take no part). A version whose
    weights are not known (compacted away, or a report from a file) is listed without a test:
    judging it by the config file's weights, which may be another version's, would raise false
    alarms. Traffic without a version (a producer that does not follow the live config) is judged
    against the config file's weights. Above a million units the check runs on a uniform sample of
    them chosen by hash (tally.UnitSample), and says so."""
    units = tally.units.counts()
    sampled = tally.units.levels
    out = []
    for version in sorted(units, key=lambda v: (v is not None, v or 0)):
        observed = units[version]
        config = exp if version is None else tally.versions.get(version)
        check: dict = {"config_version": version, "observed": observed}
        if sampled:
            check["units_sampled"] = f"1 in {2**sampled}"
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
    tally: Tally,
    exp: ExperimentConfig,
    alpha: float = 0.05,
    mde: float = 0.1,
    planned_n: int | None = None,
    correction: str = "holm",
) -> dict:
    rng = np.random.default_rng(0)
    empty = lambda: Group(rng)  # noqa: E731 a variant without responses
    srm = sample_ratio_checks(tally, exp)
    names = [v.name for v in exp.variants] + [n for n in tally.all if n not in {v.name for v in exp.variants}]
    out: dict = {
        "experiment": exp.name,
        "control": exp.control_variant,
        "alpha": alpha,
        "mde": mde,
        "correction": correction,
        "duplicates": tally.duplicates,
        "srm": srm,
        "srm_mismatch": any(c.get("mismatch") for c in srm),
        "variants": {
            name: {**summarise(tally.all.get(name) or empty()), "cancelled": tally.cancelled[name]} for name in names
        },
        "endpoints": {name: {e: n for (v, e), n in sorted(tally.endpoints.items()) if v == name} for name in names},
        "comparisons": {},
    }
    control = tally.randomised.get(exp.control_variant) or empty()
    for name in names:
        if name == exp.control_variant:
            continue
        treatment = tally.randomised.get(name) or empty()
        # The guard: significance is judged against the alpha spent so far (O'Brien-Fleming), the
        # information fraction being the smaller group over the planned per-group size.
        lat = control.latency
        plan = (
            planned_n
            or stats.sample_size_means(
                math.sqrt(lat.by_chars.variance) if lat.count > 1 else 0, mde * lat.mean if lat.count else 0, alpha
            )
            or 1
        )
        information = min(control.count, treatment.count) / plan
        spent = stats.obrien_fleming_alpha(information, alpha)
        x = _covariate(control, treatment)
        lat_q = stats.quantile_diffs(control.latency.summary(), treatment.latency.summary(), alpha=alpha)
        ttft_q = stats.quantile_diffs(control.ttft.summary(), treatment.ttft.summary(), alpha=alpha)
        out["comparisons"][name] = {
            "n_control": control.count,
            "n_treatment": treatment.count,
            "planned_n_per_group": plan,
            "information_fraction": min(1.0, information),
            "alpha_spent": spent,
            "latency_s": _means(control.latency, treatment.latency, alpha, mde, spent, x),
            "ttft_s": _means(control.ttft, treatment.ttft, alpha, mde, spent, x),
            "latency_p50": lat_q[50],
            "latency_p95": lat_q[95],
            "ttft_p50": ttft_q[50],
            "ttft_p95": ttft_q[95],
            "tokens": _means(control.tokens, treatment.tokens, alpha, mde, spent, x),
            "error_rate": _proportions(
                control.errors, control.count, treatment.errors, treatment.count, alpha, mde, spent
            ),
            "thumbs_up_rate": _proportions(
                control.thumbs_up, control.rated, treatment.thumbs_up, treatment.rated, alpha, mde, spent
            ),
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
        for m in PRIMARY:
            p = c[m]["p_adjusted"]
            c[m]["significant"] = bool(p < c["alpha_spent"]) if not math.isnan(p) else False
        for m in GUARDRAILS:  # reported apart, at alpha: neither adjusted nor held back by the peeking guard
            p = c[m]["p_value"]
            c[m]["significant"] = bool(p < out["alpha"]) if not math.isnan(p) else False


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
    mixed: Counter[str] = Counter()
    for counts in out.get("endpoints", {}).values():
        mixed.update(counts)
    if len(mixed) > 1:
        what = ", ".join(f"{e} ({n})" for e, n in sorted(mixed.items()))
        lines.append(
            f"ENDPOINTS: the figures below mix {what}: their latencies are not one distribution; "
            "pass --endpoint to report one"
        )
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
            rates = f"{_pct(r['treatment_rate'], sign=False)} against {_pct(r['control_rate'], sign=False)}"
            parts.append(
                f"{LABELS[m]} {rates} ({_points(r['difference'])} points, {level}% CI {_points(r['ci'][0])} to "
                f"{_points(r['ci'][1])}, p={r['p_value']:.2g}), "
                + ("significant at alpha" if r["significant"] else "no detectable difference")
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
        "cancelled",
        "latency_s_p50",
        "latency_s_p95",
        "latency_s_p99",
        "ttft_s_p50",
        "tokens_per_request",
        "tokens_per_s",
        "mean_token_logprob",
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


def _points(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


def _pct(x, sign: bool = True) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.1f}%" if sign else f"{100 * x:.1f}%"
