"""`abq report` and its statistics: reference values from scipy and statsmodels on fixed data, and
a synthetic experiment whose answer is known."""

import json
import math
import random
import subprocess

import pytest
import scipy.stats as scipy_stats  # test dependencies: a missing one must fail, never skip
import statsmodels.stats.power as sm_power
import statsmodels.stats.proportion as sm_prop
from conftest import REPO, abq_cmd, write_config

from abqueue.analysis import stats
from schemas import ErrorInfo, ExperimentConfig, Feedback, InferenceResponse
from schemas.response import TokenLogprob


def test_statistics_match_scipy_and_statsmodels_on_fixed_data():
    rnd = random.Random(42)
    a = [rnd.lognormvariate(0, 0.5) for _ in range(120)]
    b = [rnd.lognormvariate(0.1, 0.7) for _ in range(90)]
    w = stats.welch(a, b)
    ref = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert w.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert w.p_value == pytest.approx(ref.pvalue, rel=1e-7)
    assert w.df == pytest.approx(ref.df, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert w.ci == pytest.approx((lo, hi), rel=1e-6)
    z = stats.two_proportions(31, 1200, 52, 1100)
    zref, pref = sm_prop.proportions_ztest([52, 31], [1100, 1200])
    assert (z.statistic, z.p_value) == pytest.approx((zref, pref), rel=1e-9)
    wald = sm_prop.confint_proportions_2indep(52, 1100, 31, 1200, method="wald", compare="diff")
    assert z.ci == pytest.approx(wald, rel=1e-9)
    h = sm_prop.proportion_effectsize(0.06, 0.05)
    assert stats.sample_size_proportions(0.05, 0.06) == math.ceil(
        sm_power.NormalIndPower().solve_power(h, alpha=0.05, power=0.8, ratio=1)
    )
    d = 0.25  # Cohen's d: delta / sd
    assert stats.sample_size_means(1.0, d) == math.ceil(
        sm_power.NormalIndPower().solve_power(d, alpha=0.05, power=0.8, ratio=1)
    )
    # The bootstrap interval agrees with Welch's to within resampling noise.
    blo, bhi = stats.bootstrap_mean_diff(a, b)
    assert abs(blo - lo) < 0.05 and abs(bhi - hi) < 0.05
    # O'Brien-Fleming spending: all of alpha at the end, 0.00557 at half way, nearly none early.
    assert stats.obrien_fleming_alpha(1.0) == pytest.approx(0.05)
    assert stats.obrien_fleming_alpha(0.5) == pytest.approx(
        2 * (1 - scipy_stats.norm.cdf(1.959964 / math.sqrt(0.5))), rel=1e-5
    )
    assert stats.obrien_fleming_alpha(0.1) < 1e-8


def _responses(exp, variant, n, latency, errors, assigned_by="weights", tokens=20):
    out = []
    for i in range(n):
        t0 = 1_700_000_000 + i
        failed = i < errors
        out.append(
            InferenceResponse(
                request_id=f"{variant}-{assigned_by}-{i}",
                experiment=exp.name,
                variant=variant,
                assigned_by=assigned_by,
                model="m",
                outputs=[] if failed else ["x"],
                finish_reason="error" if failed else "stop",
                usage={"prompt_tokens": 5, "completion_tokens": 0 if failed else tokens + i % 5},
                timings={
                    "enqueued": t0,
                    "dequeued": t0,
                    "started": t0,
                    "first_token": t0 + 0.1,
                    "finished": t0 + latency(i),
                    "ttft_s": 0.1,
                },
                worker_id="w",
                error={"code": "engine_error", "message": "boom"} if failed else None,
            )
        )
    return out


def test_report_on_a_known_synthetic_experiment_gives_the_known_answer(tmp_path):
    exp = ExperimentConfig.model_validate(
        {"name": "known", "control": "a", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    a = _responses(exp, "a", 1000, lambda i: 1.0 + (i % 10) * 0.1, errors=20)
    b = _responses(exp, "b", 1000, lambda i: 1.1 * (1.0 + (i % 10) * 0.1), errors=50)
    beta = _responses(
        exp, "b", 30, lambda i: 9.0, errors=0, assigned_by="override:beta"
    )  # not randomised: kept out of tests
    for r, values in ((b[-1], [[-1.0, -2.0]]), (b[-2], [[-0.5]])):  # two answers with token logprobs
        r.logprobs = [[TokenLogprob(token="t", logprob=v) for v in sample] for sample in values]
    feedback = [
        Feedback(request_id=r.request_id, experiment=exp.name, thumbs="up" if i < 600 else "down")
        for i, r in enumerate(a)
    ] + [
        Feedback(request_id=r.request_id, experiment=exp.name, thumbs="up" if i < 700 else "down")
        for i, r in enumerate(b)
    ]
    rpath, fpath = tmp_path / "responses.jsonl", tmp_path / "feedback.jsonl"
    rpath.write_text(
        "".join(r.model_dump_json() + "\n" for r in a + b + beta + a[:5])
    )  # a[:5] again: duplicates count once
    fpath.write_text("".join(f.model_dump_json() + "\n" for f in feedback))
    out = subprocess.run(
        abq_cmd(
            "report",
            "--config",
            str(write_config(exp, tmp_path)),
            "--input",
            str(rpath),
            "--feedback",
            str(fpath),
            "--format",
            "json",
            "--plot",
            str(tmp_path / "plots"),
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    va, vb = res["variants"]["a"], res["variants"]["b"]
    assert (va["count"], vb["count"]) == (1000, 1030)
    assert vb["by_assignment"] == {"weights": 1000, "override:beta": 30}
    assert (va["error_rate"], vb["error_rate"]) == (0.02, 50 / 1030)
    assert va["thumbs_up_rate"] == 0.6 and vb["thumbs_up_rate"] == 0.7
    assert va["mean_token_logprob"] is None and vb["mean_token_logprob"] == pytest.approx(-3.5 / 3)  # per token
    c = res["comparisons"]["b"]
    assert (c["n_control"], c["n_treatment"]) == (1000, 1000)
    lat_a = [1.0 + (i % 10) * 0.1 for i in range(20, 1000)]
    lat_b = [1.1 * (1.0 + (i % 10) * 0.1) for i in range(50, 1000)]
    ref = scipy_stats.ttest_ind(lat_b, lat_a, equal_var=False)
    assert c["latency_s"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    # Unix-time timestamps keep latencies to about 1e-7 s.
    assert c["latency_s"]["lift"] == pytest.approx(sum(lat_b) / len(lat_b) / (sum(lat_a) / len(lat_a)) - 1, rel=1e-5)
    zref, pref = sm_prop.proportions_ztest([50, 20], [1000, 1000])
    assert (c["error_rate"]["z"], c["error_rate"]["p_value"]) == pytest.approx((zref, pref), rel=1e-9)
    assert c["error_rate"]["lift"] == pytest.approx(1.5)  # 5% against 2%
    zref, pref = sm_prop.proportions_ztest([700, 600], [1000, 1000])
    assert c["thumbs_up_rate"]["p_value"] == pytest.approx(pref, rel=1e-9)
    assert c["latency_s"]["significant"] and c["error_rate"]["significant"] and c["thumbs_up_rate"]["significant"]
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "effects_forest.png",
        "error_rate_and_traffic_split.png",
        "latency_cdf.png",
    ]


def test_alpha_spending_keeps_an_early_look_from_declaring_a_winner():
    exp = ExperimentConfig.model_validate(
        {"name": "early", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    from abqueue.analysis.report import report
    from abqueue.analysis.tally import Tally

    # Thumbs up 50% vs 62% over 400 requests each: significant on its own (p < 0.001), but only 400
    # of a planned 5,000 have been seen, and an early look spends almost none of alpha.
    a = _responses(exp, "a", 400, lambda i: 1.0, errors=8)
    b = _responses(exp, "b", 400, lambda i: 1.0, errors=30)
    feedback = [
        Feedback(request_id=r.request_id, experiment=exp.name, thumbs="up" if i < up else "down")
        for rs, up in ((a, 200), (b, 248))
        for i, r in enumerate(rs)
    ]
    _, p_alone = sm_prop.proportions_ztest([248, 200], [400, 400])
    assert p_alone < 0.001
    early = report(Tally.of(a + b, feedback), exp, planned_n=5000)["comparisons"]["b"]
    assert early["information_fraction"] == pytest.approx(0.08)
    assert early["thumbs_up_rate"]["p_value"] == pytest.approx(p_alone, rel=1e-9)
    assert early["alpha_spent"] < 1e-6 and not early["thumbs_up_rate"]["significant"]
    # The error rate is a guardrail: judged at alpha from the first look (2% vs 7.5%, p < 0.001).
    assert early["error_rate"]["significant"]
    # The same data at the planned size: all of alpha is spent, and the difference is significant.
    final = report(Tally.of(a + b, feedback), exp, planned_n=400)["comparisons"]["b"]
    assert final["information_fraction"] == 1.0 and final["alpha_spent"] == pytest.approx(0.05)
    assert final["thumbs_up_rate"]["significant"]


def test_report_reads_responses_shadow_answers_and_feedback_from_the_topics(settings, kafka_bootstrap, tmp_path):
    from kafka import KafkaProducer

    from abqueue.kafka import ensure_topics
    from schemas import encode

    exp = ExperimentConfig.model_validate(
        {
            "name": f"topics{random.randrange(10**9)}",
            "variants": [
                {"name": "a", "weight": 50},
                {"name": "b", "weight": 50},
                {"name": "s", "weight": 0, "shadow_of": "a"},
            ],
        }
    )
    ensure_topics(settings, exp)
    a = _responses(exp, "a", 40, lambda i: 1.0, errors=2)
    b = _responses(exp, "b", 30, lambda i: 2.0, errors=3)
    shadow = _responses(exp, "s", 10, lambda i: 1.5, errors=0, assigned_by="shadow:a")
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for r in a + b + a[:3]:  # duplicates count once
        p.send(exp.response_topic, key=b"k", value=encode(r))
    for r in shadow:
        p.send(exp.shadow_response_topic, key=b"k", value=encode(r))
    # Ten thumbs on a's answers: all "down" first, then "up" for four of them later: the latest wins.
    for i in range(10):
        down = Feedback(request_id=a[i].request_id, experiment=exp.name, thumbs="down", created_at=1_800_000_000)
        p.send(exp.feedback_topic, key=b"k", value=encode(down))
    for i in range(4):
        up = Feedback(request_id=a[i].request_id, experiment=exp.name, thumbs="up", created_at=1_800_000_100)
        p.send(exp.feedback_topic, key=b"k", value=encode(up))
    p.flush()
    p.close()
    out = subprocess.run(
        abq_cmd("report", "--config", str(write_config(exp, tmp_path)), "--format", "json",
                "--bootstrap-servers", kafka_bootstrap),
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    va, vb, vs = (res["variants"][v] for v in ("a", "b", "s"))
    assert (va["count"], vb["count"], vs["count"]) == (40, 30, 10)
    assert (va["error_rate"], vb["error_rate"]) == (2 / 40, 3 / 30)
    assert va["feedback_count"] == 10 and va["thumbs_up_rate"] == 0.4


def _unit_responses(exp, variant, units, version=None, assigned_by="weights", per_unit=1, tag=""):
    """Responses from `units` users (each sending `per_unit` requests) assigned to `variant`."""
    out = []
    for u in range(units):
        for k in range(per_unit):
            (r,) = _responses(exp, variant, 1, lambda i: 1.0, errors=0, assigned_by=assigned_by)
            out.append(
                r.model_copy(
                    update={
                        "request_id": f"{variant}-{version}-{assigned_by}-{tag}{u}-{k}",
                        "unit": f"{variant}{tag}{u}",
                        "config_version": version,
                    }
                )
            )
    return out


def test_sample_ratio_is_checked_per_config_version_on_units_assigned_by_the_weights():
    from abqueue.analysis.report import report
    from abqueue.analysis.tally import Tally

    exp = ExperimentConfig.model_validate(
        {"name": "srm", "variants": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]}
    )
    v1 = exp.model_copy(update={"variants": [v.model_copy(update={"weight": 50}) for v in exp.variants]})
    rs = (
        # version 1 (50/50): 520 vs 480 users, a fair split; one heavy user of b sends 300 requests
        _unit_responses(exp, "a", 520, version=1)
        + _unit_responses(exp, "b", 479, version=1)
        + _unit_responses(exp, "b", 1, version=1, per_unit=300, tag="heavy")
        # version 2 (90/10): 850 vs 150 users, which 90/10 weights cannot explain
        + _unit_responses(exp, "a", 850, version=2)
        + _unit_responses(exp, "b", 150, version=2)
        # not assigned by the weights: no part in the check
        + _unit_responses(exp, "b", 400, version=2, assigned_by="override:beta")
        + _unit_responses(exp, "b", 400, version=2, assigned_by="pinned")
    )
    out = report(Tally.of(rs, versions={1: v1, 2: exp}), exp)
    first, second = out["srm"]
    assert first["observed"] == {"a": 520, "b": 480}  # units, not requests: the heavy user counts once
    assert first["p_value"] == pytest.approx(scipy_stats.chisquare([520, 480], [500, 500]).pvalue, rel=1e-9)
    assert not first["mismatch"]
    assert second["observed"] == {"a": 850, "b": 150}
    assert second["p_value"] == pytest.approx(scipy_stats.chisquare([850, 150], [900, 100]).pvalue, rel=1e-9)
    assert second["p_value"] < 0.001 and second["mismatch"] and out["srm_mismatch"]
    assert out["summary"][0].startswith("SRM: MISMATCH (config v2")
    # Read from a file, the versions' weights are unknown: judged by the file's (version 2's) weights,
    # version 1's fair 50/50 split would raise a false alarm, so it is listed untested.
    blind = report(Tally.of(rs), exp)
    assert all("p_value" not in c and "not known here" in c["note"] for c in blind["srm"])
    assert blind["summary"][0].startswith("SRM: not checked: the weights of config version 1")
    # Counted by requests, the heavy user alone would have looked like a broken split in version 1.
    assert scipy_stats.chisquare([520, 779], [649.5, 649.5]).pvalue < 0.001


def test_primary_metrics_are_adjusted_together_across_variants_and_guardrails_are_not():
    from statsmodels.stats.multitest import multipletests

    from abqueue.analysis.report import GUARDRAILS, PRIMARY, report
    from abqueue.analysis.tally import Tally

    exp = ExperimentConfig.model_validate(
        {"name": "many", "variants": [{"name": n, "weight": w} for n, w in (("a", 34), ("b", 33), ("c", 33))]}
    )
    rnd = random.Random(3)
    rs = (
        _responses(exp, "a", 300, lambda i: rnd.lognormvariate(0, 0.4), errors=6)
        + _responses(exp, "b", 300, lambda i: rnd.lognormvariate(0.05, 0.4), errors=9)
        + _responses(exp, "c", 300, lambda i: rnd.lognormvariate(0.2, 0.4), errors=15)
    )
    for method, name in (("holm", "holm"), ("bh", "fdr_bh")):
        out = report(Tally.of(rs), exp, planned_n=300, correction=method)
        cells = [(v, m) for v in ("b", "c") for m in PRIMARY]
        raw = [out["comparisons"][v][m]["p_value"] for v, m in cells]
        present = [i for i, p in enumerate(raw) if not math.isnan(p)]
        ref = multipletests([raw[i] for i in present], method=name)[1]
        got = [out["comparisons"][cells[i][0]][cells[i][1]]["p_adjusted"] for i in present]
        assert got == pytest.approx(list(ref), rel=1e-12)
        for v in ("b", "c"):
            for m in GUARDRAILS:
                assert "p_adjusted" not in out["comparisons"][v][m]
    c = report(Tally.of(rs), exp, planned_n=300)["comparisons"]["c"]
    assert c["latency_p50"]["significant"] and c["latency_p50"]["lift"] > 0.1


def test_quantile_intervals_cover_the_true_difference_95_percent_of_the_time():
    """500 simulated experiments (lognormal latencies, the treatment's 20% slower at every quantile):
    the 95% bootstrap intervals of the p50 and p95 differences must cover the true differences in
    93-97% of them."""
    from statistics import NormalDist

    rnd = random.Random(11)
    z = {50: 0.0, 95: NormalDist().inv_cdf(0.95)}
    true = {q: math.exp(math.log(1.2) + 0.5 * z[q]) - math.exp(0.5 * z[q]) for q in z}
    covered = {50: 0, 95: 0}
    runs = 500
    for seed in range(runs):
        c = [rnd.lognormvariate(0, 0.5) for _ in range(1000)]
        t = [rnd.lognormvariate(math.log(1.2), 0.5) for _ in range(1000)]
        got = stats.quantile_diffs(c, t, (50, 95), rounds=1000, seed=seed)
        for q in z:
            lo, hi = got[q]["ci"]
            covered[q] += lo <= true[q] <= hi
    print(
        f"\ncoverage of 95% intervals over {runs} experiments: p50 {covered[50] / runs:.3f}, p95 {covered[95] / runs:.3f}"
    )
    assert 0.93 * runs <= covered[50] <= 0.97 * runs
    assert 0.93 * runs <= covered[95] <= 0.97 * runs


def test_a_bootstrap_interval_from_a_subsample_is_as_wide_as_from_the_whole(monkeypatch):
    rnd = random.Random(5)
    c = [rnd.lognormvariate(0, 0.5) for _ in range(8000)]
    t = [rnd.lognormvariate(0.1, 0.5) for _ in range(8000)]
    whole = stats.quantile_diffs(c, t, (50, 95), rounds=1000)
    whole_mean = stats.bootstrap_mean_diff(c, t, rounds=1000)
    monkeypatch.setattr(stats, "BOOTSTRAP_CAP", 1000)
    sub = stats.quantile_diffs(c, t, (50, 95), rounds=1000)
    sub_mean = stats.bootstrap_mean_diff(c, t, rounds=1000)
    assert sub_mean[1] - sub_mean[0] == pytest.approx(whole_mean[1] - whole_mean[0], rel=0.2)
    assert sum(sub_mean) / 2 == pytest.approx(sum(whole_mean) / 2, abs=0.01)
    for q in (50, 95):
        w = whole[q]["ci"][1] - whole[q]["ci"][0]
        s = sub[q]["ci"][1] - sub[q]["ci"][0]
        assert s == pytest.approx(w, rel=0.2), (q, s, w)
        assert sub[q]["difference"] == whole[q]["difference"]


def test_regression_adjustment_removes_the_variance_its_covariate_explains():
    """y = x + noise, both of variance 1: the covariate explains half of y's variance, so CUPED must
    remove half, keep the difference unbiased (as ordinary least squares with the covariate does)
    and narrow the interval by sqrt(1/2)."""
    import numpy as np
    import statsmodels.api as sm

    from abqueue.analysis.report import report
    from abqueue.analysis.tally import Tally

    rnd = random.Random(9)
    n = 20_000
    xc = [rnd.gauss(0, 1) for _ in range(n)]
    xt = [rnd.gauss(0, 1) for _ in range(n)]
    yc = [x + rnd.gauss(0, 1) for x in xc]
    yt = [x + 0.05 + rnd.gauss(0, 1) for x in xt]
    adj, raw = stats.cuped(yc, xc, yt, xt), stats.welch(yc, yt)
    assert adj["variance_reduction"] == pytest.approx(0.5, abs=0.02)
    assert adj["theta"] == pytest.approx(1.0, abs=0.02)
    x = np.array(xc + xt)
    ols = sm.OLS(np.array(yc + yt), np.column_stack([np.ones(2 * n), [0] * n + [1] * n, x - x.mean()])).fit()
    assert adj["difference"] == pytest.approx(ols.params[1], abs=2e-3)
    assert adj["difference"] == pytest.approx(0.05, abs=0.03)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(adj["ci"]) / width(raw.ci) == pytest.approx(math.sqrt(0.5), rel=0.03)

    # In the report: latency that grows with the prompt's length is tested adjusted for it.
    exp = ExperimentConfig.model_validate(
        {"name": "cuped", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    chars = [rnd.randint(10, 2000) for _ in range(800)]
    rs = []
    for variant, shift in (("a", 0.0), ("b", 0.02)):
        for i, r in enumerate(_responses(exp, variant, 400, lambda i: 1.0, errors=0)):
            c = chars[i + (400 if variant == "b" else 0)]
            finished = r.timings.enqueued + 0.5 + c / 1000 + shift + rnd.gauss(0, 0.05)
            rs.append(
                r.model_copy(
                    update={
                        "usage": r.usage.model_copy(update={"prompt_chars": c}),
                        "timings": r.timings.model_copy(update={"finished": finished}),
                    }
                )
            )
    latency = report(Tally.of(rs), exp, planned_n=400)["comparisons"]["b"]["latency_s"]
    assert latency["cuped"]["used"] and latency["cuped"]["variance_reduction"] > 0.9
    width_adj, width_raw = width(latency["ci"]), width(latency["unadjusted_ci"])
    assert width_adj < 0.3 * width_raw and latency["significant"]


def _report_json(exp, path, tmp_path, *flags) -> dict:
    """`abq report --format json` over the responses at `path`, without feedback."""
    path.with_name("none.jsonl").write_text("")
    out = subprocess.run(
        abq_cmd("report", "--config", str(write_config(exp, tmp_path)), "--input", str(path), "--feedback",
                str(path.with_name("none.jsonl")), "--format", "json", *flags),
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_report_covers_only_its_window_of_time_and_config_version(tmp_path):
    exp = ExperimentConfig.model_validate(
        {"name": "window", "control": "a", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    rs = [
        r.model_copy(update={"config_version": 1 + i // 50})  # versions 1 and 2, 50 responses each
        for v in ("a", "b")
        for i, r in enumerate(_responses(exp, v, 100, lambda i: 1.0, errors=0))
    ]  # enqueued at 1_700_000_000 + i
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in rs))

    def counts(*flags):
        return {name: v["count"] for name, v in _report_json(exp, path, tmp_path, *flags)["variants"].items()}

    assert counts() == {"a": 100, "b": 100}
    assert counts("--since", "1700000010", "--until", "1700000030") == {"a": 20, "b": 20}
    assert counts("--since", "2023-11-14T22:13:40Z") == {"a": 80, "b": 80}  # 1_700_000_020
    assert counts("--config-version", "2") == {"a": 50, "b": 50}


def test_the_sketch_keeps_every_percentile_within_its_accuracy():
    import numpy as np

    from abqueue.analysis.tally import SKETCH_ACCURACY, Sketch

    rng = np.random.default_rng(4)
    values = np.concatenate([rng.lognormal(0, 2, 1_000_000), np.zeros(1000), -rng.lognormal(-3, 1, 5000)])
    rng.shuffle(values)
    sketch = Sketch()
    for chunk in np.array_split(values, 37):
        sketch.extend(chunk)
    assert sketch.count == len(values)
    assert len(sketch.positive) + len(sketch.negative) < 5000  # bounded by the range, not the count
    for q in (0.1, 0.3, 0.5, 1, 10, 50, 90, 95, 99, 99.9, 100):
        exact = float(np.quantile(values, q / 100, method="inverted_cdf"))  # nearest rank
        assert sketch.percentile(q) == pytest.approx(exact, rel=SKETCH_ACCURACY, abs=1e-12), q


def test_a_streamed_column_gives_the_whole_samples_tests_from_moments_and_a_uniform_sample(monkeypatch):
    """Beyond the bootstrap cap a column keeps only moments, a sketch and a uniform sample, folded
    in chunk by chunk: Welch's test and CUPED must equal those on every value, and the sample must
    be the whole's in distribution."""
    import numpy as np

    from abqueue.analysis import tally

    monkeypatch.setattr(tally, "CHUNK", 7_000)
    rng = np.random.default_rng(8)
    cols, raw = [], []
    for shift in (0.0, 0.01):
        x = rng.integers(10, 2000, 60_000).astype(float)
        y = 0.5 + x / 2000 + rng.exponential(0.5, len(x)) + shift
        col = tally.Column(np.random.default_rng(1))
        for i in range(0, len(y), tally.CHUNK):
            col.extend(y[i : i + tally.CHUNK], x[i : i + tally.CHUNK], 2 * x[i : i + tally.CHUNK])
        cols.append(col)
        raw.append((y, x))
    (yc, xc), (yt, xt) = raw
    w = stats.welch(cols[0].summary(), cols[1].summary())
    ref = scipy_stats.ttest_ind(yt, yc, equal_var=False)
    assert (w.statistic, w.p_value) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-7)
    streamed = stats.cuped_from(cols[0].by_chars, cols[1].by_chars)
    whole = stats.cuped(yc.tolist(), xc.tolist(), yt.tolist(), xt.tolist())
    for k in ("theta", "variance_reduction", "difference", "p_value"):
        assert streamed[k] == pytest.approx(whole[k], rel=1e-7), k
    sample = cols[0].summary().sample
    assert len(sample) == stats.BOOTSTRAP_CAP
    assert scipy_stats.ks_2samp(sample, yc).pvalue > 0.001
    for q in (50, 95):
        exact = float(np.quantile(yc, q / 100, method="inverted_cdf"))
        assert cols[0].percentile(q) == pytest.approx(exact, rel=0.005)
    # And the bootstrap interval of the p95 difference is as wide as that from every value.
    got = stats.quantile_diffs(cols[0].summary(), cols[1].summary(), (95,), rounds=1000)[95]
    full = stats.quantile_diffs(yc.tolist(), yt.tolist(), (95,), rounds=1000)[95]
    assert got["ci"][1] - got["ci"][0] == pytest.approx(full["ci"][1] - full["ci"][0], rel=0.2)


def test_the_unit_sample_keeps_the_sample_ratio_check_valid_and_memory_bounded():
    """Units kept by a hash independent of the assignment split as the whole does: on fair splits the
    check's p-values stay uniform (no false alarms beyond alpha), and an unfair one is still caught."""
    from abqueue.analysis.tally import UnitSample

    rnd = random.Random(6)
    p_values = []
    for run in range(200):
        units = UnitSample(size=400)
        for u in range(3000):
            units.add(1, "ab"[rnd.random() < 0.5], f"u{run}-{u}")
        assert units.levels > 0 and units.kept <= 400
        observed = units.counts()[1]
        p_values.append(scipy_stats.chisquare([observed.get("a", 0), observed.get("b", 0)]).pvalue)
    # Discrete counts make the p-values only roughly uniform: compare their quantiles, not a KS test.
    assert sum(p < 0.05 for p in p_values) <= 20 and sum(p < 0.5 for p in p_values) >= 80
    units = UnitSample(size=2000)
    for u in range(40_000):
        units.add(1, "ab"[rnd.random() < 0.4], f"skewed-{u}")
    observed = units.counts()[1]
    assert units.kept <= 2000
    assert scipy_stats.chisquare([observed["a"], observed["b"]]).pvalue < 0.001


def test_a_report_streams_in_memory_bounded_by_the_variants_not_the_responses(monkeypatch):
    """80,000 responses through a tally whose windows are small: what it holds after 40,000 and
    after 80,000 is the same, and it counts a duplicate within its window once."""
    import tracemalloc

    from abqueue.analysis import tally

    monkeypatch.setattr(tally, "RECENT_IDS", 2_000)
    monkeypatch.setattr(tally, "UNIT_SAMPLE", 2_000)
    exp = ExperimentConfig.model_validate(
        {"name": "bounded", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    (template,) = _responses(exp, "a", 1, lambda i: 1.0, errors=0)
    t = tally.Tally()
    held = []
    tracemalloc.start()
    for i in range(80_000):
        r = template.model_copy(update={"request_id": f"r{i}", "variant": "ab"[i % 2], "unit": f"u{i // 3}"})
        t.add(r)
        if i % 1000 == 999:
            t.add(r)  # a redelivery, right after the first
        if i + 1 in (40_000, 80_000):
            held.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    t.done()
    assert t.count == 80_000 and t.duplicates == 80
    assert held[1] < held[0] * 1.1, held
    assert t.units.levels > 0


def test_two_callers_requests_that_share_ids_are_both_counted_and_feedback_lands_on_its_own_callers_answer():
    """Request ids are the callers' own: two batch jobs both numbering lines request-1..20 sent 40
    requests, and a report counted 20 (the rest as duplicates); feedback given by one caller landed
    on the other's answer. A duplicate is the same caller's request answered twice."""
    from abqueue.analysis.tally import Tally

    exp = ExperimentConfig.model_validate(
        {"name": "shared-ids", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    mine = [r.model_copy(update={"request_id": f"request-{i}", "caller_tag": "job-1"}) for i, r in enumerate(_responses(exp, "a", 20, lambda i: 1.0, errors=0))]  # fmt: skip
    theirs = [r.model_copy(update={"caller_tag": "job-2"}) for r in mine]
    untagged = [r.model_copy(update={"caller_tag": None}) for r in mine]
    feedback = [Feedback(request_id="request-3", experiment=exp.name, caller_tag="job-2", thumbs="down")]
    t = Tally.of(mine + theirs + untagged + mine[:5], feedback)  # mine[:5] again: redelivered, counted once
    assert (t.count, t.duplicates) == (60, 5)
    assert (t.all["a"].rated, t.all["a"].thumbs_up) == (1, 0)  # job-2's thumbs-down, on job-2's answer alone


def test_a_rollout_stage_counts_two_callers_requests_that_share_ids():
    from abqueue.control.rollout import StageStats

    exp = ExperimentConfig.model_validate(
        {"name": "shared-ids", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    one = _responses(exp, "a", 20, lambda i: 1.0, errors=0)
    records = [
        type("Record", (), {"value": r.model_copy(update={"caller_tag": tag}).model_dump_json().encode()})
        for tag in ("job-1", "job-2")
        for r in one + one[:3]
    ]
    st = StageStats.__new__(StageStats)  # the counting alone, no consumer behind it
    st._counting(since=0.0, version=None)
    st._take(records)
    assert st.count("a") == 40


def test_the_error_rate_is_a_guardrail_judged_at_alpha_and_the_headline_says_what_the_numbers_say():
    """A candidate failing ~25% of requests got "error rate no detectable difference": the error rate
    went through the peeking guard, whose alpha is planned from latency's sample size."""
    from abqueue.analysis.report import report
    from abqueue.analysis.tally import Tally

    exp = ExperimentConfig.model_validate(
        {"name": "errs", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    rnd = random.Random(5)
    rs = _responses(exp, "a", 60, lambda i: rnd.lognormvariate(0, 0.5), errors=1)
    rs += _responses(exp, "b", 60, lambda i: rnd.lognormvariate(0, 0.5), errors=15)
    out = report(Tally.of(rs), exp, planned_n=10_000)  # early: the guard spends almost no alpha
    err = out["comparisons"]["b"]["error_rate"]
    assert err["p_value"] < 0.01 and out["comparisons"]["b"]["alpha_spent"] < 1e-6
    assert err["significant"] and "p_adjusted" not in err
    (line,) = [s for s in out["summary"] if s.startswith("b:")]
    assert "error rate 25.0% against 1.7% (+23.3 points" in line and "significant at alpha" in line, line


def test_lift_and_difference_on_one_line_are_one_estimate_when_regression_adjusted():
    """The difference, CI and p were CUPED-adjusted, the lift and its CI were not ("tokens diff
    -0.044 CI [-0.24, 0.15] lift -49.1% [-60.1%, -38.1%] p 0.66")."""
    from abqueue.analysis.report import report, to_table
    from abqueue.analysis.tally import Tally

    exp = ExperimentConfig.model_validate(
        {"name": "cuped-lift", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    rnd = random.Random(11)
    rs = []
    for variant, long_prompts in (("a", 0), ("b", 1)):  # b happened to get longer prompts: raw means differ
        for r in _responses(exp, variant, 400, lambda i: 1.0, errors=0):
            c = rnd.randint(10, 1000) + 800 * long_prompts
            finished = r.timings.enqueued + 0.5 + c / 1000 + rnd.gauss(0, 0.05)
            rs.append(r.model_copy(update={"usage": r.usage.model_copy(update={"prompt_chars": c}), "timings": r.timings.model_copy(update={"finished": finished})}))  # fmt: skip
    out = report(Tally.of(rs), exp, planned_n=400)
    lat = out["comparisons"]["b"]["latency_s"]
    assert lat["cuped"]["used"] and not lat["significant"]
    assert lat["lift"] * lat["control_mean"] == pytest.approx(lat["difference"])
    assert lat["lift_ci"][0] < 0 < lat["lift_ci"][1]  # as the adjusted difference's CI: no difference
    assert lat["unadjusted_lift"] > 0.5  # the raw means' lift, kept apart and named
    assert "CUPED" in to_table(out)


def test_the_endpoint_is_a_column_and_one_endpoint_is_reported_alone(tmp_path):
    """Embeddings answer in milliseconds and chats in seconds: one variant's two endpoints must not be
    one latency distribution. The report says how many answers each endpoint has per variant, warns
    when the figures mix them, and --endpoint reports one."""
    from abqueue.analysis.report import Window, load, report, to_json

    exp = ExperimentConfig.model_validate(
        {"name": "ends", "control": "a", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    rs = []
    for v in ("a", "b"):
        chats = _responses(exp, v, 60, lambda i: 2.0, errors=0)
        rs += [r.model_copy(update={"endpoint": "/v1/chat/completions", "outputs": [],
                                    "body": {"object": "chat.completion", "choices": []}}) for r in chats]  # fmt: skip
        vectors = _responses(exp, v, 40, lambda i: 0.01, errors=0, assigned_by="embed")
        rs += [r.model_copy(update={"endpoint": "/v1/embeddings", "outputs": [], "body": {"object": "list"}})
               for r in vectors]  # fmt: skip
        rs += _responses(exp, v, 10, lambda i: 1.0, errors=0, assigned_by="old")  # no body: endpoint "none"
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in rs))

    def in_process(endpoint=None):  # the command's own steps, without a process's start-up for each
        return json.loads(to_json(report(load(None, exp, path, None, Window(endpoint=endpoint)), exp)))

    whole = in_process()
    assert whole["endpoints"]["a"] == {"/v1/chat/completions": 60, "/v1/embeddings": 40, "none": 10}
    assert any(line.startswith("ENDPOINTS: the figures below mix") for line in whole["summary"])
    alone = _report_json(exp, path, tmp_path, "--endpoint", "/v1/embeddings")  # the flag, through the command
    assert {n: v["count"] for n, v in alone["variants"].items()} == {"a": 40, "b": 40}
    assert alone["variants"]["a"]["latency_s_p95"] < 0.1  # the chats' 2 s are not in it
    assert not any(line.startswith("ENDPOINTS") for line in alone["summary"])
    assert in_process("none")["endpoints"]["b"] == {"none": 10}


def test_cancelled_answers_are_counted_apart_and_never_as_the_variants_errors(tmp_path):
    """A caller that went away says nothing about the variant: its cancelled answer is neither in the
    error rate nor in the latencies, and the report counts cancels per variant on a row of their own."""
    from abqueue.analysis.report import Window, load, report, to_json, to_table

    exp = ExperimentConfig.model_validate(
        {"name": "gone", "control": "a", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    rs = _responses(exp, "a", 50, lambda i: 1.0, errors=0) + _responses(exp, "b", 50, lambda i: 1.0, errors=0)
    gone = _responses(exp, "b", 7, lambda i: 30.0, errors=7, assigned_by="gone")
    rs += [r.model_copy(update={"error": ErrorInfo(code="cancelled", message="cancelled by its caller")}) for r in gone]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in rs))
    result = json.loads(to_json(report(load(None, exp, path, None, Window()), exp)))
    b = result["variants"]["b"]
    assert (b["count"], b["error_rate"], b["cancelled"], result["variants"]["a"]["cancelled"]) == (50, 0.0, 7, 0)
    assert b["latency_s_p99"] < 2.0  # the cancelled requests' 30 s are not the variant's latency
    assert any(line.split() == ["cancelled", "0", "7"] for line in to_table(result).splitlines())
