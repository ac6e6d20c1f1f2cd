import json

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from schemas import (
    ConfigError,
    ExperimentConfig,
    InferenceRequest,
    InferenceResponse,
    SchemaError,
    Timings,
    decode_request,
    encode,
    load_experiment,
)
from schemas.export import DEFAULT_DIR, MODELS, check


def req(**kw):
    return InferenceRequest(**{"experiment": "demo", "routing_key": "u1", "prompt": "hi", **kw})


def test_request_round_trip_through_the_wire_encoding():
    r = req(messages=None, prompt="hello", stop=["\n"], seed=7, n=2, metadata={"k": [1, 2]})
    assert decode_request(encode(r)) == r


def test_request_needs_exactly_one_of_prompt_or_messages():
    with pytest.raises(ValidationError, match="exactly one"):
        InferenceRequest(experiment="demo", routing_key="u")
    with pytest.raises(ValidationError, match="exactly one"):
        req(messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\xff\xfe not json", "not_json"),
        (b"[1, 2]", "invalid_schema"),
        (b'{"experiment": "demo"}', "invalid_schema"),
        (b'{"experiment": "demo", "routing_key": "u", "prompt": "p", "surprise": 1}', "invalid_schema"),
        (b'{"experiment": "demo", "routing_key": "u", "prompt": "p", "temperature": 9}', "invalid_params"),
        (b'{"experiment": "demo", "routing_key": "u", "prompt": "p", "n": 0}', "invalid_params"),
        (b'{"experiment": "demo", "routing_key": "u", "prompt": "p", "max_tokens": -1}', "invalid_params"),
    ],
)
def test_decode_errors_carry_a_dead_letter_reason(data, reason):
    with pytest.raises(SchemaError) as e:
        decode_request(data)
    assert e.value.reason == reason
    assert "\n" not in e.value.detail


def test_exported_json_schemas_match_the_models():
    assert check() == [], "run `abq schemas export` and commit the files"


def test_json_schema_accepts_what_the_models_accept_and_rejects_what_they_reject():
    schema = json.loads((DEFAULT_DIR / "inference_request.schema.json").read_text())
    good = orjson.loads(encode(req(stop=["x"], seed=1)))
    jsonschema.validate(good, schema)
    for bad in ({**good, "temperature": 3.5}, {k: v for k, v in good.items() if k != "routing_key"}, {**good, "n": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ValidationError):
            InferenceRequest.model_validate(bad)
    resp = InferenceResponse(
        request_id="r",
        experiment="demo",
        variant="a",
        model="m",
        outputs=["x"],
        timings=Timings(enqueued=1, dequeued=2, finished=3),
        worker_id="w",
    )
    jsonschema.validate(
        orjson.loads(encode(resp)), json.loads((DEFAULT_DIR / "inference_response.schema.json").read_text())
    )
    assert set(MODELS) == {p.name.removesuffix(".schema.json") for p in DEFAULT_DIR.glob("*.schema.json")}


@pytest.mark.parametrize(
    "variants,message",
    [
        ([{"name": "a", "weight": 50}, {"name": "b", "weight": 40}], "sum to 90"),
        ([{"name": "a", "weight": 50}, {"name": "a", "weight": 50}], "duplicate variant names: a"),
        ([{"name": "a", "weight": 100, "engine": "tgi"}], "engine"),
        ([{"name": "A.b", "weight": 100}], "pattern"),
        ([{"name": "a", "weight": 99.995}, {"name": "b", "weight": 0.005}], "two decimals"),
    ],
)
def test_invalid_experiment_configs_are_refused_with_one_line(tmp_path, variants, message):
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps({"name": "x", "variants": variants}))
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing YAML file with --config"):
        load_experiment(tmp_path / "nope.yaml")


def test_topic_naming_rule():
    exp = ExperimentConfig(name="chat", variants=[{"name": "ctl", "weight": 100}])
    assert exp.request_topic("ctl") == "abq.chat.ctl.requests"
    assert exp.response_topic == "abq.chat.responses"
    assert exp.deadletter_topic == "abq.chat.deadletter"
    assert exp.consumer_group("ctl") == "abq.chat.ctl.workers"
    assert load_experiment(None).name == "demo"
