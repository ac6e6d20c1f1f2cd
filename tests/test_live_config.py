"""Live experiment configs in Kafka: a running producer follows weight changes within seconds,
sticky keys only move toward the variant gaining weight, new variants get topics, invalid configs
are never published, and segment overrides win over the weights."""

import subprocess
import time

import yaml
from conftest import REPO, abq_cmd, new_experiment, write_config
from kafka_helpers import committed, end_offsets, responses, wait_until

from abqueue.control import live_config
from abqueue.kafka import admin_client
from producers import AbqClient
from producers.assignment import assign
from schemas import ExperimentConfig, InferenceRequest
from schemas.response import unit_of


def _assignments(client, exp, keys):
    return {
        k: client.publisher.assign(InferenceRequest(experiment=exp.name, routing_key=k, prompt="x")).variant
        for k in keys
    }


def test_weight_change_reaches_a_running_producer_within_5s_and_keys_only_move_to_the_gainer(
    settings, kafka_bootstrap, tmp_path
):
    exp = new_experiment(variants=(("control", 90), ("candidate", 10)))
    live_config.apply(settings, exp)
    keys = [f"user-{i}" for i in range(3000)]
    with AbqClient(settings, exp, follow=True) as client:
        before = _assignments(client, exp, keys)
        probe = InferenceRequest(experiment=exp.name, routing_key="user-0", prompt="x")
        assert client.publisher.assign(probe).config_version == 1  # the version whose weights chose it
        raised = exp.model_copy(
            update={
                "variants": [
                    exp.variants[0].model_copy(update={"weight": 70}),
                    exp.variants[1].model_copy(update={"weight": 30}),
                ]
            }
        )
        path = write_config(raised, tmp_path)
        out = subprocess.run(
            abq_cmd("experiment", "apply", str(path), "--comment", "ramp", "--bootstrap-servers", kafka_bootstrap),
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        assert "v2: control 70, candidate 30 (was v1: control 90, candidate 10)" in out.stdout
        applied = time.monotonic()
        while client.publisher.experiment.variants[1].weight != 30 and time.monotonic() - applied < 5:
            time.sleep(0.05)
        took = time.monotonic() - applied
        assert took < 5, "the producer did not pick up the new weights within 5 s"
        after = _assignments(client, exp, keys)
        assert client.publisher.assign(probe).config_version == 2
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "control" and after[k] == "candidate" for k in moved)
    share = sum(v == "candidate" for v in after.values()) / len(keys)
    assert 0.27 < share < 0.33
    print(
        f"\nnew weights in use {took * 1000:.0f} ms after `abq experiment apply` returned; "
        f"{len(moved)} of {len(keys)} keys moved, all control -> candidate"
    )


def test_a_new_variant_gets_its_topics_and_traffic_without_a_restart(settings):
    exp = new_experiment(variants=(("a", 100),))
    live_config.apply(settings, exp)
    with AbqClient(settings, exp, follow=True) as client:
        grown = ExperimentConfig.model_validate(
            {
                **exp.model_dump(),
                "variants": [
                    {**exp.variants[0].model_dump(), "weight": 50},
                    {"name": "b", "weight": 50, "engine": "echo"},
                ],
            }
        )
        live_config.apply(settings, grown)
        wait_until(lambda: len(client.publisher.experiment.variants) == 2, 5, "the new config in the producer")
        # Its topics exist the moment the producer can route to it, before anything is published.
        admin = admin_client(settings)
        try:
            assert set(grown.request_topics("b").values()) <= set(admin.list_topics())
        finally:
            admin.close()
        req, fut = client.publish(InferenceRequest(experiment=exp.name, routing_key="k", prompt="x"))
        routed = [
            client.publisher.assign(InferenceRequest(experiment=exp.name, routing_key=f"k{i}", prompt="x"))
            for i in range(200)
        ]
        assert fut.get(timeout=10).topic == grown.request_topic(req.variant)
    assert {r.variant for r in routed} == {"a", "b"}, "the new variant gets no traffic"


def test_invalid_configs_are_refused_with_one_line_and_never_published(settings, kafka_bootstrap, tmp_path):
    exp = new_experiment(variants=(("a", 60), ("b", 40)))
    live_config.apply(settings, exp)
    raw = exp.model_dump(mode="json")
    cases = {
        "weights": ({**raw, "variants": [{**raw["variants"][0], "weight": 70}, raw["variants"][1]]}, "sum to 110"),
        "engine": ({**raw, "variants": [{**raw["variants"][0], "engine": "tgi"}, raw["variants"][1]]}, "engine"),
        "duplicate": (
            {**raw, "variants": [raw["variants"][0], {**raw["variants"][1], "name": "a"}]},
            "duplicate variant",
        ),
        # Valid on its own, impossible on this one-broker cluster: it was applied, then every producer
        # and worker refused it.
        "replicas": ({**raw, "replication_factor": 3}, "replication_factor 3 needs 3 brokers but the cluster has 1"),
    }
    for name, (bad, words) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bad))
        out = subprocess.run(
            abq_cmd("experiment", "apply", str(path), "--bootstrap-servers", kafka_bootstrap),
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, (name, out.stderr)
    assert [r.version for r in live_config.read_all(settings, exp.name)] == [1]
    show = subprocess.run(
        abq_cmd("experiment", "show", exp.name, "--bootstrap-servers", kafka_bootstrap),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert show.returncode == 0 and f"{exp.name} v1" in show.stdout and "a 60, b 40" in show.stdout


def test_segment_overrides_win_over_weights_and_are_reported_apart():
    exp = ExperimentConfig.model_validate(
        {
            "name": "seg",
            "variants": [{"name": "control", "weight": 100}, {"name": "candidate", "weight": 0}],
            "overrides": [
                {"name": "beta", "match": {"user_group": "beta-testers"}, "variant": "candidate"},
                {"name": "staff", "match": {"team": ["ml", "infra"], "internal": True}, "variant": "candidate"},
            ],
        }
    )
    assert assign(exp, "u1", {"user_group": "beta-testers"}) == ("candidate", "override:beta")
    assert assign(exp, "u1", {"team": "ml", "internal": True}) == ("candidate", "override:staff")
    assert assign(exp, "u1", {"team": "ml"}) == ("control", "weights")  # every key must match
    assert assign(exp, "u1", {}) == ("control", "weights")


def test_override_traffic_is_served_by_its_variant_and_labelled_in_the_response(settings, thread_worker):
    base = new_experiment(variants=(("control", 100), ("candidate", 0)))
    exp = ExperimentConfig.model_validate(
        {
            **base.model_dump(),
            "overrides": [{"name": "beta", "match": {"user_group": "beta-testers"}, "variant": "candidate"}],
        }
    )
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), AbqClient(settings, exp) as client:
        beta = client.submit(
            InferenceRequest(
                experiment=exp.name, routing_key="u1", prompt="hi", metadata={"user_group": "beta-testers"}
            ),
            timeout=30,
        ).response
        plain = client.submit(InferenceRequest(experiment=exp.name, routing_key="u1", prompt="hi"), timeout=30).response
        pinned = client.submit(
            InferenceRequest(experiment=exp.name, routing_key="u1", prompt="hi", variant="control"), timeout=30
        ).response
    # Each response names its user by a salted hash (the unit of the sample-ratio check), never by the key.
    assert beta.unit == plain.unit == pinned.unit == unit_of(exp.name, "u1") and "u1" not in beta.unit
    assert plain.config_version is None  # this producer reads a file, not the live config
    assert (beta.variant, beta.assigned_by) == ("candidate", "override:beta")
    assert (plain.variant, plain.assigned_by) == ("control", "weights")
    assert (pinned.variant, pinned.assigned_by) == ("control", "pinned")


def test_a_shadow_variant_answers_copies_apart_and_callers_only_see_the_real_answer(settings, thread_worker):

    base = new_experiment(variants=(("control", 100), ("shadow", 0)))
    exp = ExperimentConfig.model_validate(
        {
            **base.model_dump(),
            "variants": [
                base.variants[0].model_dump(),
                {**base.variants[1].model_dump(), "shadow_of": "control", "shadow_percent": 50},
            ],
        }
    )
    ids = []
    with thread_worker(exp, "control"), thread_worker(exp, "shadow"), AbqClient(settings, exp) as client:
        for i in range(200):
            req, _ = client.publish(InferenceRequest(experiment=exp.name, routing_key=f"user-{i}", prompt="hi"))
            ids.append(req.id)
        client.publisher.flush()
        seen = []
        got = client.wait(set(ids), timeout=30, on_reply=lambda r: seen.append(r.response))
        # Every shadow copy answered (committed), so any shadow answer on the caller's topic is there now.
        shadow_topic = exp.request_topic("shadow")
        group = exp.consumer_group("shadow")

        def shadow_done():
            return committed(settings, group, shadow_topic) == {
                p: o for p, o in end_offsets(settings, shadow_topic).items() if o > 0
            }

        wait_until(shadow_done, 30, "the shadow worker answering its copies")
    assert set(got) == set(ids)
    on_callers_topic = responses(settings, exp.response_topic, expect=len(ids))
    assert len(on_callers_topic) == len(ids)
    assert {r.variant for r in on_callers_topic} == {"control"}  # the caller's topic never carries a shadow answer
    shadows = responses(settings, exp.shadow_response_topic, expect=1)
    assert (
        shadows
        and {r.variant for r in shadows} == {"shadow"}
        and {r.assigned_by for r in shadows} == {"shadow:control"}
    )
    assert set(r.request_id for r in shadows) <= set(ids)
    assert 0.35 < len({r.request_id for r in shadows}) / len(ids) < 0.65  # about shadow_percent of the traffic


def test_shadow_configs_that_make_no_sense_are_refused():
    import pytest

    base = {"name": "s", "variants": [{"name": "a", "weight": 100}, {"name": "b", "weight": 0, "shadow_of": "a"}]}
    ExperimentConfig.model_validate(base)
    for bad, words in (
        (
            {**base, "variants": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10, "shadow_of": "a"}]},
            "must have weight 0",
        ),
        (
            {**base, "variants": [{"name": "a", "weight": 100}, {"name": "b", "weight": 0, "shadow_of": "zz"}]},
            "not another of the variants",
        ),
        ({**base, "overrides": [{"name": "o", "match": {"k": "v"}, "variant": "b"}]}, "shadows never answer callers"),
    ):
        with pytest.raises(ValueError, match=words):
            ExperimentConfig.model_validate(bad)


def test_a_following_worker_applies_new_limits_without_a_restart(settings):
    from conftest import ThreadWorker
    from kafka_helpers import dead_letters

    from abqueue.control.live_config import ConfigFollower

    exp = new_experiment(variants=(("a", 100),))
    live_config.apply(settings, exp)
    follower = ConfigFollower(settings)
    follower.caught_up.wait(timeout=10)
    long_prompt = "word " * 60  # 300 characters
    try:
        with ThreadWorker(settings, exp, "a", follow=follower) as worker, AbqClient(settings, exp) as client:
            first = client.submit(
                InferenceRequest(experiment=exp.name, routing_key="u", prompt=long_prompt), timeout=30
            )
            assert first.response.ok
            tighter = ExperimentConfig.model_validate(
                {**exp.model_dump(), "variants": [{**exp.variants[0].model_dump(), "max_prompt_chars": 100}]}
            )
            live_config.apply(settings, tighter)
            wait_until(lambda: worker.variant.max_prompt_chars == 100, 5, "the new limit in the worker")
            req, fut = client.publish(InferenceRequest(experiment=exp.name, routing_key="u", prompt=long_prompt))
            fut.get(timeout=10)
            letters = dead_letters(settings, exp.deadletter_topic, expect=1, timeout=20)
    finally:
        follower.close()
    assert [(dl.request_id, dl.reason) for dl in letters] == [(req.id, "oversized_prompt")]


def test_config_versions_are_unique_and_ordered_when_two_writers_race(settings, monkeypatch):
    """Two writers (a rollout controller and `abq experiment apply`) read version N and both
    published N+1 with different weights; the sample-ratio check then judged by the wrong weights."""
    exp = new_experiment(variants=(("a", 50), ("b", 50)))
    first = live_config.apply(settings, exp)
    follower = live_config.ConfigFollower(settings)
    try:
        ours = exp.model_copy(update={"variants": [exp.variants[0].model_copy(update={"weight": 90}), exp.variants[1].model_copy(update={"weight": 10})]})  # fmt: skip
        theirs = exp.model_copy(update={"variants": [exp.variants[0].model_copy(update={"weight": 20}), exp.variants[1].model_copy(update={"weight": 80})]})  # fmt: skip
        other = live_config.apply(settings, theirs)  # the other writer, having read version 1 too
        real_current = live_config.current
        stale = iter([first])  # this writer's first read was before the other's write
        monkeypatch.setattr(live_config, "current", lambda s, n: next(stale, None) or real_current(s, n))
        mine = live_config.apply(settings, ours)
        monkeypatch.undo()
        assert (first.version, other.version, mine.version) == (1, 2, 3)
        versions = [r.version for r in live_config.read_all(settings, exp.name)]
        assert versions == [1, 2, 3]  # the lost write of version 2 is passed over by every reader
        live = live_config.current(settings, exp.name)
        assert live.version == 3 and live.experiment == ours
        wait_until(lambda: (r := follower.get(exp.name)) is not None and r.version == 3, 10, "the follower at v3")
        assert follower.get(exp.name).experiment == ours
    finally:
        follower.close()
