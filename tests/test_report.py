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
from schemas import ExperimentConfig, Feedback, InferenceResponse


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
    assert stats.t_ppf(0.975, 7.5) == pytest.approx(scipy_stats.t.ppf(0.975, 7.5), rel=1e-9)
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
    c = res["comparisons"]["b"]
    assert (c["n_control"], c["n_treatment"]) == (1000, 1000)
    lat_a = [1.0 + (i % 10) * 0.1 for i in range(20, 1000)]
    lat_b = [1.1 * (1.0 + (i % 10) * 0.1) for i in range(50, 1000)]
    ref = scipy_stats.ttest_ind(lat_b, lat_a, equal_var=False)
    assert c["latency_s"]["p_value"] == pytest.approx(
        ref.pvalue, rel=1e-4
    )  # at 3e-25 the continued fraction keeps 4 digits
    # Unix-time timestamps keep latencies to about 1e-7 s.
    assert c["latency_s"]["lift"] == pytest.approx(sum(lat_b) / len(lat_b) / (sum(lat_a) / len(lat_a)) - 1, rel=1e-5)
    zref, pref = sm_prop.proportions_ztest([50, 20], [1000, 1000])
    assert (c["error_rate"]["z"], c["error_rate"]["p_value"]) == pytest.approx((zref, pref), rel=1e-9)
    assert c["error_rate"]["lift"] == pytest.approx(1.5)  # 5% against 2%
    zref, pref = sm_prop.proportions_ztest([700, 600], [1000, 1000])
    assert c["thumbs_up_rate"]["p_value"] == pytest.approx(pref, rel=1e-9)
    assert c["latency_s"]["significant"] and c["error_rate"]["significant"] and c["thumbs_up_rate"]["significant"]
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "error_rate_and_traffic_split.png",
        "latency_cdf.png",
    ]


def test_alpha_spending_keeps_an_early_look_from_declaring_a_winner():
    exp = ExperimentConfig.model_validate(
        {"name": "early", "variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}
    )
    from abqueue.analysis.report import Sample, report

    # 2% vs 7.5% errors over 400 requests each: significant on its own (p < 0.001), but only 400 of
    # a planned 5,000 have been seen, and an early look spends almost none of alpha.
    a = _responses(exp, "a", 400, lambda i: 1.0, errors=8)
    b = _responses(exp, "b", 400, lambda i: 1.0, errors=30)
    _, p_alone = sm_prop.proportions_ztest([30, 8], [400, 400])
    assert p_alone < 0.001
    early = report(Sample(a + b), exp, planned_n=5000)["comparisons"]["b"]
    assert early["information_fraction"] == pytest.approx(0.08)
    assert early["error_rate"]["p_value"] == pytest.approx(p_alone, rel=1e-9)
    assert early["alpha_spent"] < 1e-6 and not early["error_rate"]["significant"]
    # The same data at the planned size: all of alpha is spent, and the difference is significant.
    final = report(Sample(a + b), exp, planned_n=400)["comparisons"]["b"]
    assert final["information_fraction"] == 1.0 and final["alpha_spent"] == pytest.approx(0.05)
    assert final["error_rate"]["significant"]


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
