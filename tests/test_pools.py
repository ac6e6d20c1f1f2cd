"""Pools: variants of one base model served by one worker and engine. The config's rules (one-line
refusals), each variant's treatment (system prompt, sampling, adapter settings), admission's fair
turns between variants, and the pool worker on the stub transport, then once on the real broker
(with its KEDA plan). The pool on vLLM with two real LoRA adapters is in test_vllm_engine.py."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
from conftest import metric_values, write_config
from test_cli import abq
from test_worker_loop import ManualEngine

from abqueue.kafka import ensure_topics
from producers import AbqClient
from schemas import ConfigError, ExperimentConfig, InferenceRequest, encode, load_experiment
from workers.admission import Admission
from workers.engines import lora
from workers.treatment import apply_variant


def pool_experiment(**extra) -> ExperimentConfig:
    """base (50%), sys (25%, a system prompt and a sampling ceiling), wide (25%, logprobs up to 2)
    in pool 'shared' on the echo engine; `extra` adds top-level keys."""
    return ExperimentConfig.model_validate(
        {
            "name": f"t{uuid.uuid4().hex[:10]}",
            "partitions": 2,
            "variants": [
                {"name": "base", "weight": 50, "pool": "shared", "engine": "echo", "model": "echo-base",
                 "scaling": {"max_replicas": 3, "lag_threshold": 10}},
                {"name": "sys", "weight": 25, "pool": "shared", "system_prompt": "be brief",
                 "sampling": {"temperature": 0.2, "max_tokens": 3}},
                {"name": "wide", "weight": 25, "pool": "shared", "max_top_logprobs": 2},
            ],
            **extra,
        }
    )  # fmt: skip


def test_a_pool_shares_its_first_variants_engine_and_refuses_another_base_model(tmp_path):
    exp = pool_experiment()
    assert {v.model for v in exp.variants} == {"echo-base"} and exp.variant("wide").scaling.max_replicas == 3
    assert exp.serving("shared") == exp.serving("sys") == exp.variants and exp.serving_units() == ["shared"]
    assert exp.consumer_group("sys") == exp.consumer_group("shared") == f"abq.{exp.name}.shared.pool.workers"
    assert ExperimentConfig.model_validate(exp.model_dump()) == exp  # what the config map holds loads again

    def refusal(change) -> str:
        data = pool_experiment().model_dump(exclude_unset=True)
        change(data["variants"])
        path = tmp_path / "x.yaml"
        path.write_text(json.dumps(data))
        with pytest.raises(ConfigError) as e:
            load_experiment(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "shares pool 'shared' but names another base model than 'base' ('other', not 'echo-base')" in refusal(
        lambda vs: vs[1].update(model="other")
    )
    assert "has a LoRA adapter but pool 'shared' runs engine 'echo'" in refusal(
        lambda vs: vs[2].update(lora={"path": str(tmp_path)})
    )
    assert "pool 'sys' has the name of a variant" in refusal(lambda vs: vs[0].update(pool="sys"))


def test_adapters_are_checked_at_start_and_the_engine_gets_room_for_them(tmp_path):
    def variant(name, path):
        return {"name": name, "weight": 50, "pool": "p", "engine": "vllm", "model": "/m", "lora": {"path": str(path)}}

    def adapter(name: str, rank: int):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
        return tmp_path / name

    exp = ExperimentConfig(name="e", variants=[variant("a", adapter("a", 8)), variant("b", adapter("b", 32))])
    found = lora.adapters(exp.variants)
    assert {v: (a.name, a.rank) for v, a in found.items()} == {"a": ("a", 8), "b": ("b", 32)}
    assert lora.engine_args(found, {"max_num_seqs": 4}) == {
        "max_num_seqs": 4, "enable_lora": True, "max_loras": 3, "max_lora_rank": 32,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="variant b's LoRA adapter has rank 32, above the engine's max_lora_rank 16"):
        lora.engine_args(found, {"max_lora_rank": 16})
    missing = ExperimentConfig(name="e", variants=[variant("a", tmp_path / "nowhere"), variant("b", tmp_path / "b")])
    with pytest.raises(ConfigError, match=r"variant a's LoRA adapter .*nowhere does not exist; point lora.path"):
        lora.adapters(missing.variants)


def test_a_variants_system_prompt_and_sampling_replace_the_callers():
    exp = pool_experiment()
    chat = InferenceRequest(
        experiment=exp.name, routing_key="k", max_tokens=10, temperature=1.0,
        messages=[{"role": "system", "content": "be verbose"}, {"role": "user", "content": "hi"}],
    )  # fmt: skip
    treated = apply_variant(chat, exp.variant("sys"))
    assert [(m.role, m.content) for m in treated.messages] == [("system", "be brief"), ("user", "hi")]
    assert (treated.temperature, treated.max_tokens) == (0.2, 3)
    plain = InferenceRequest(experiment=exp.name, routing_key="k", prompt="hi", max_tokens=2)
    assert apply_variant(plain, exp.variant("sys")).prompt == "be brief\n\nhi"
    assert apply_variant(plain, exp.variant("sys")).max_tokens == 2  # a ceiling, never a raise
    assert apply_variant(plain, exp.variant("base")) is plain


def test_variants_take_turns_within_a_level_and_one_variants_flood_pauses_only_its_topics():
    from types import SimpleNamespace

    from kafka import TopicPartition

    from workers.message import Message

    adm = Admission({"high": ["a.high", "b.high"], "normal": ["a", "b"]}, capacity=10)

    def msgs(topic, n):
        return [
            Message(SimpleNamespace(topic=topic, partition=0, offset=i), dequeued_at=i, variant=topic[0])
            for i in range(n)
        ]

    adm.add(msgs("a", 10) + msgs("b", 3))
    assert [m.variant for m in adm.pick(8)] == ["a", "b", "a", "b", "a", "b", "a", "a"]

    class Consumer:
        paused: set = set()

        def assignment(self):
            return {TopicPartition(t, 0) for t in ("a", "b", "a.high", "b.high")}

        def pause(self, *tps):
            self.paused |= set(tps)

        def resume(self, *tps):
            self.paused -= set(tps)

    adm.add(msgs("a", 10))
    c = Consumer()
    adm.apply_pauses(c)
    assert c.paused == {TopicPartition("a", 0)}  # b's records still come in
    assert adm.room() == 10


def test_a_pool_worker_answers_each_request_as_its_own_variant(stub_worker):
    exp = pool_experiment()
    with stub_worker(exp, "shared") as w:
        sent = {
            "base": w.send("base", prompt="one two three four", logprobs=True, top_logprobs=1, n=2),
            "sys": w.send("sys", prompt="one two three four"),
            "wide": w.send("wide", prompt="x", logprobs=True, top_logprobs=3),  # above wide's limit of 2
        }
        # A request for base written to sys's topic: a pool's worker must not run it as either.
        sent["wrong"] = wrong = InferenceRequest(experiment=exp.name, routing_key="k", prompt="x", variant="base")
        w.broker.produce(exp.request_topic("sys"), encode(wrong), key=b"k")
        got = {r.request_id: r for r in w.wait_responses(4)}
        metrics = metric_values(_metrics(w.worker))
        per_variant = {v: metric_values(_metrics(w.worker), variant=v) for v in ("base", "sys", "wide")}
    base, sys_, wide, wrong = (got[sent[k].id] for k in ("base", "sys", "wide", "wrong"))
    assert (base.variant, sys_.variant, wide.variant, wrong.variant) == ("base", "sys", "wide", "sys")
    assert base.outputs == ["one two three four"] * 2
    assert [[t.token for t in s] for s in base.logprobs] == [["one", "two", "three", "four"]] * 2
    assert all(t.logprob == 0.0 and len(t.top_logprobs) == 1 for s in base.logprobs for t in s)
    assert sys_.outputs == ["be brief one"] and sys_.logprobs is None  # its system prompt; its max_tokens ceiling of 3
    assert sys_.usage.prompt_chars == base.usage.prompt_chars == len("one two three four")  # the caller's prompt
    assert (
        wide.error.code == "invalid_request" and "top_logprobs 3 exceeds the variant's limit of 2" in wide.error.message
    )
    assert wrong.error.code == "invalid_request" and "wrong_variant" in wrong.error.message
    assert w.committed() and all(tp.topic in w.worker._variant_of for tp in w.committed())
    assert per_variant["base"]["abq_requests_total"] == 1 and per_variant["sys"]["abq_requests_total"] == 2
    assert per_variant["wide"]["abq_dead_letters_total"] == 1
    assert metric_values(_metrics(w.worker), variant="shared")["abq_inflight_limit"] > 0  # engine-wide: the pool's
    assert metrics["abq_requests_total"] == 4


def test_no_variant_of_a_pool_starves_while_another_floods_it(stub_worker):
    exp, engine = pool_experiment(), ManualEngine()
    with stub_worker(exp, "shared", engine=engine, max_inflight=8) as w:
        for i in range(40):
            w.send("base", prompt=f"flood {i}")
        engine.wait_running(8)  # the flood is in: the engine is full of base, base's buffer fills up
        for i in range(5):
            w.send("sys", prompt=f"late {i}")
        w.broker.wait_for(lambda: w.worker.admission.waiting() == 13, what="sys's requests buffered behind the flood")
        order: list[str] = []
        deadline = time.monotonic() + 10
        while len(order) < 45 and time.monotonic() < deadline:
            for r in engine.wait_running(1):
                order.append(r.variant)
                engine.finish(r.id)
        w.wait_responses(45)
    # Once sys's requests wait beside base's they get every other slot: all five within ten, not after 32.
    first_sys = order.index("sys")
    assert first_sys <= 9 and Counter(order[first_sys : first_sys + 10])["sys"] == 5, order


def _metrics(worker) -> str:
    from prometheus_client import generate_latest

    return generate_latest(worker.registry).decode()


def test_a_pool_worker_process_serves_its_variants_and_keda_plans_the_pool(settings, spawn_worker, tmp_path):
    exp = pool_experiment()
    ensure_topics(settings, exp)
    cfg = str(write_config(exp, tmp_path))

    def plan() -> dict:
        r = abq(
            "keda",
            "plan",
            "--config",
            cfg,
            "--format",
            "json",
            env={"ABQ_BOOTSTRAP_SERVERS": settings.bootstrap_servers},
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["variants"]

    reqs = [InferenceRequest(experiment=exp.name, routing_key=f"user-{i}", prompt=f"hello {i}") for i in range(60)]
    with AbqClient(settings, exp) as client:
        sent = {r.id: client.publish(r)[0] for r in reqs}
        client.publisher.flush()
        waiting = plan()  # before any worker: the per-topic triggers see the backlog and wake the pool
        proc = spawn_worker(exp, "shared")
        got = client.wait(set(sent), timeout=90)
    assert len(got) == 60, proc.log_path.read_text()[-2000:]
    assert list(waiting) == ["shared"] and waiting["shared"]["active"]
    assert sum(t["total_lag"] for t in waiting["shared"]["triggers"] if t["topic"]) == 60
    assert {t["topic"] for t in waiting["shared"]["triggers"]} == {*(
        t for v in exp.variants for t in exp.request_topics(v.name).values()), None}  # fmt: skip
    by_variant = Counter(r.response.variant for r in got.values())
    assert set(by_variant) == {"base", "sys", "wide"} and all(r.response.ok for r in got.values())
    assert all(r.response.variant == sent[rid].variant for rid, r in got.items())
    assert all(r.response.outputs[0].startswith("be brief") == (r.response.variant == "sys") for r in got.values())
    done = plan()["shared"]  # all answered and committed: no lag anywhere, and the total trigger sees the commits
    assert done["current_replicas"] == 1 and not any(t["total_lag"] for t in done["triggers"])
    total = next(t for t in done["triggers"] if t["topic"] is None)
    assert {p["partition"] for p in total["partitions"]} and done["desired_replicas"] <= 1


def test_a_pool_renders_one_deployment_and_one_scaled_object_on_its_total_lag():
    from abqueue.cli.main import build_parser
    from abqueue.deploy.render import Target, render
    from abqueue.deploy.validate import validate_files
    from abqueue.kafka import acls

    exp = pool_experiment()
    files = render(exp, Target(bootstrap_servers="b:9093", security_protocol="SASL_SSL", kafka_users="scram-sha-512"))
    validate_files(files)
    kinds = Counter(d["kind"] for docs in files.values() for d in docs)
    assert kinds["Deployment"] == kinds["ScaledObject"] == kinds["PodDisruptionBudget"] == 1
    container = files["k8s/deployment-shared.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["worker", *container["args"]])  # the image's entrypoint is `abq worker`
    assert args.command == "worker" and args.variant == "shared"
    spec = files["keda/scaledobject-shared.yaml"][0]["spec"]
    triggers = {t["name"]: t["metadata"] for t in spec["triggers"]}
    topics = {t for v in exp.variants for t in exp.request_topics(v.name).values()}
    assert {m.get("topic") for m in triggers.values()} == {*topics, None} and len(triggers) == 10
    assert "topic" not in triggers["lag-pool"]  # KEDA sums the lag of every topic the group has committed in
    assert {m["consumerGroup"] for m in triggers.values()} == {exp.consumer_group("shared")}
    assert (spec["maxReplicaCount"], triggers["lag-pool"]["lagThreshold"]) == (3, "10")
    # One worker user for the pool: it reads all three variants' topics in the pool's group, nothing else's
    # (besides the live config and the experiment's cancels, which every worker reads).
    (worker,) = [p for p in acls.principals(exp, []) if p.role == "worker"]
    read = {g.name for g in worker.grants if g.resource == "topic" and "Read" in g.operations}
    assert read == topics | {acls.CONFIG_TOPIC, exp.cancel_topic}
    assert {g.name for g in worker.grants if g.resource == "group"} == {exp.consumer_group("shared")}


def test_a_variants_chat_template_and_adapter_are_picked_by_the_requests_variant(tmp_path):
    pytest.importorskip("vllm")
    from tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    from workers.engines.vllm_common import PromptPrep

    prep = PromptPrep()
    prep.tokenizer, prep.max_model_len = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path)), 1000
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    exp = ExperimentConfig.model_validate({"name": "e", "variants": [
        {"name": "base", "weight": 50, "pool": "p", "engine": "vllm", "model": "/m"},
        {"name": "plain", "weight": 50, "pool": "p", "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
         "lora": {"path": str(adapter), "name": "plain-v1"}},
    ]})  # fmt: skip
    prep._init_prep(lora.adapters(exp.variants), {"plain": exp.variant("plain").chat_template})

    def rendered(variant: str) -> str:
        req = InferenceRequest(
            experiment="e", routing_key="k", variant=variant, messages=[{"role": "user", "content": "hi"}]
        )
        return prep.tokenizer.decode(prep._render(req))

    assert rendered("plain") == "[hi]" and rendered("base") == "<|user|>hi\n<|assistant|>"
    req = InferenceRequest(experiment="e", routing_key="k", variant="plain", prompt="x")
    assert prep.lora(req).lora_name == "plain-v1" and prep.lora(req.model_copy(update={"variant": "base"})) is None


def test_keda_simulate_takes_a_pools_scaling_settings_and_all_its_partitions(tmp_path):
    from abqueue.cli.keda_cmd import _settings
    from abqueue.cli.main import build_parser

    exp = pool_experiment()
    cfg = str(write_config(exp, tmp_path))
    for name in ("shared", "sys"):  # the pool, or any of its variants
        args = build_parser().parse_args(
            [
                "keda",
                "simulate",
                "--config",
                cfg,
                "--variant",
                name,
                "--per-replica-rps",
                "5",
                "--profile",
                "burst:100@60",
            ]
        )
        s = _settings(args)
        assert (s.lagThreshold, s.maxReplicas, s.partitions) == (10, 3, 3 * exp.partitions_for("shared"))


def test_a_live_config_change_says_what_waits_for_a_restart_and_applies_the_rest(stub_worker, caplog):
    from types import SimpleNamespace

    exp = pool_experiment()
    data = exp.model_dump()
    data["variants"][1].update(system_prompt="be kind", chat_template="{{ messages }}")
    data["variants"].append({**data["variants"][2], "name": "late", "weight": 0})
    new = ExperimentConfig.model_validate(data)
    with stub_worker(exp, "shared") as w:
        with caplog.at_level("WARNING", logger="workers.worker"):
            w.worker._config_changed(SimpleNamespace(experiment=new, version=2))
        w.send("sys", prompt="hi")
        (r,) = w.wait_responses(1)
    assert r.outputs == ["be kind hi"]  # the new system prompt is in use at once
    said = " | ".join(rec.getMessage() for rec in caplog.records)
    assert "changes sys's chat_template; that applies when the worker restarts" in said and "system_prompt" not in said
    assert "adds late to pool shared; this worker serves it once restarted" in said
