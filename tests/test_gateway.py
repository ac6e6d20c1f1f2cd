"""`abq gateway`: OpenAI's endpoints over the queues, called with the official `openai` SDK (no
hand-written HTTP), against the real broker and echo workers."""

import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import openai  # a test dependency: a missing one must fail, never skip
import orjson
import pytest
import uvicorn
from conftest import REPO, abq_cmd, metric_values, new_experiment, write_config
from kafka_helpers import wait_until

from abqueue.gateway.app import Gateway, Limits, create_app
from abqueue.gateway.tenants import Tenants
from abqueue.kafka import admin_client, ensure_topics
from abqueue.localkafka.broker import free_port
from schemas.experiment import SegmentOverride

KEYS = {"sk-acme-0123456789abcdef": "acme", "sk-beta-0123456789abcdef": "beta"}


@contextmanager
def serving(settings, exps, keys=KEYS, storage=None, instance=None, **limits):
    """A gateway in a thread of the test process, on a free port; yields its base URL."""
    instance = instance or f"test-{os.getpid()}"
    gateway = Gateway(settings, exps, Tenants(keys), instance, Limits(**limits), storage=storage)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the gateway listening")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        gateway.close()


def _client(url, key="sk-acme-0123456789abcdef", **kw):
    return openai.OpenAI(base_url=url, api_key=key, **kw)


def _two_variants(settings, **kw):
    exp = new_experiment(variants=(("a", 50), ("b", 50)), **kw)
    exp = exp.model_copy(
        update={"overrides": [SegmentOverride(name="beta", match={"x-user-group": "beta-testers"}, variant="b")]}
    )
    ensure_topics(settings, exp)
    return exp


def test_chat_and_completions_through_the_sdk_sticky_by_user_with_overrides_and_pins(settings, thread_worker):
    exp = _two_variants(settings)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp]) as url:
        client = _client(url)
        raw = client.chat.completions.with_raw_response.create(
            model=exp.name, messages=[{"role": "user", "content": "hello there"}], user="user-1", max_tokens=8
        )
        chat = raw.parse()
        assert chat.choices[0].message.content == "hello there"  # the echo engine answers with the prompt
        assert chat.object == "chat.completion" and chat.usage.completion_tokens > 0
        first = raw.headers["x-abq-variant"]
        assert first in ("a", "b") and raw.headers["x-abq-request-id"].startswith("gw-")
        # Sticky: the same user always gets the same variant; many users reach both.
        for _ in range(3):
            again = client.completions.with_raw_response.create(model=exp.name, prompt="one two", user="user-1")
            assert again.headers["x-abq-variant"] == first
            assert again.parse().choices[0].text == "one two"
        seen = {
            client.completions.with_raw_response.create(model=exp.name, prompt="x", user=f"u{i}").headers[
                "x-abq-variant"
            ]
            for i in range(30)
        }
        assert seen == {"a", "b"}
        # A header the experiment's overrides name is metadata: beta testers go to b whoever they are.
        for i in range(5):
            beta = client.completions.with_raw_response.create(
                model=exp.name, prompt="x", user=f"u{i}", extra_headers={"x-user-group": "beta-testers"}
            )
            assert beta.headers["x-abq-variant"] == "b"
        pinned = client.completions.with_raw_response.create(model=f"{exp.name}:a", prompt="x", user="u-b-user")
        assert pinned.headers["x-abq-variant"] == "a"
        # Logprobs in OpenAI's shapes: chat's content list, completions' parallel lists.
        lp = client.chat.completions.create(model=exp.name, messages=[{"role": "user", "content": "hi there"}],
                                            logprobs=True, top_logprobs=1, n=2).choices  # fmt: skip
        assert len(lp) == 2 and [t.token for t in lp[1].logprobs.content] == ["hi", "there"]
        assert lp[0].logprobs.content[0].top_logprobs[0].token == "hi" and lp[0].logprobs.content[0].bytes == [104, 105]
        legacy = client.completions.create(model=exp.name, prompt="one two", logprobs=1).choices[0].logprobs
        assert legacy.tokens == ["one", "two"] and legacy.token_logprobs == [0.0, 0.0] and legacy.text_offset == [0, 3]
        assert client.completions.create(model=exp.name, prompt="x").choices[0].logprobs is None
        models = [m.id for m in client.models.list()]
        assert models == [exp.name, f"{exp.name}:a", f"{exp.name}:b"]
        text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        served = metric_values(text, endpoint="completions", status="200")["abq_gateway_requests_total"]
        assert served == 3 + 30 + 5 + 1 + 2  # every completion above, by endpoint and status
        assert metric_values(text, endpoint="completions", variant="a")["abq_gateway_requests_total"] >= 1


def test_errors_keep_openai_s_shape_and_status(settings, thread_worker, caplog):
    exp = _two_variants(settings)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp], max_body_bytes=2000) as url:
        client = _client(url, max_retries=0)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(openai.AuthenticationError) as e:
                _client(url, key="sk-wrong-0123456789abcdef").completions.create(model=exp.name, prompt="x")
            assert e.value.code == "invalid_api_key"
            with pytest.raises(openai.NotFoundError) as e:
                client.completions.create(model="nope", prompt="x")
            assert e.value.code == "model_not_found" and e.value.param == "model"
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=f"{exp.name}:zzz", prompt="x")
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model=exp.name, prompt="x", stream_options={"include_usage": True})
            assert e.value.param == "stream_options"
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model=exp.name, prompt="x", temperature=5)
            assert e.value.param == "temperature" and "less than or equal to 2" in e.value.message
            with pytest.raises(openai.BadRequestError) as e:  # OpenAI's documented bound, whatever the engine
                client.completions.create(model=exp.name, prompt="x", frequency_penalty=3)
            assert e.value.param == "frequency_penalty"
            # Every other field travels to the variant's engine, which judges it (vLLM: tests/test_openai_bodies.py).
            client.completions.create(model=exp.name, prompt="x", frequency_penalty=0.5, extra_body={"min_tokens": 1})
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=exp.name, messages=[{"role": "user", "content": 7}])
            assert e.value.param == "messages.0.content"
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model=exp.name, prompt="x" * 5000)
            assert e.value.status_code == 413
        for key in KEYS:
            assert key not in caplog.text  # keys never reach a log


OPENAI_ERROR_TYPES = {"invalid_request_error", "rate_limit_error", "server_error", "timeout"}


def test_every_error_the_gateway_answers_has_openai_s_shape_and_one_type_vocabulary(settings, thread_worker):
    """Errors a worker answered (an engine error, a request it refused) and requests no route takes
    carry OpenAI's error types too; a worker's own codes (engine_error, invalid_request) were the type."""
    exp = new_experiment(variants=(("a", 50), ("b", 50)))
    exp.variants[1].engine_args = {"error_rate": 1.0}
    ensure_topics(settings, exp)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp]) as url:
        client = _client(url, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=f"{exp.name}:b", prompt="x")
        assert e.value.body["type"] == "server_error" and e.value.code == "engine_error"
        with pytest.raises(openai.BadRequestError) as e:  # the worker refuses it: over max_tokens_limit
            client.completions.create(model=f"{exp.name}:a", prompt="x", max_tokens=5000)
        assert e.value.body["type"] == "invalid_request_error" and e.value.code == "invalid_request"
        for method, path in (("GET", "/nowhere"), ("DELETE", "/chat/completions")):
            req = urllib.request.Request(
                url + path, method=method, headers={"Authorization": f"Bearer {next(iter(KEYS))}"}
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            body = orjson.loads(e.value.read())
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
            assert body["error"]["type"] in OPENAI_ERROR_TYPES and e.value.code in (404, 405)


def test_no_answer_in_time_is_504_and_an_over_bound_backlog_is_429_with_retry_after(settings):
    exp = _two_variants(settings)  # no worker: nothing is answered and requests wait
    with serving(settings, [exp], request_timeout_s=1.5, max_backlog=3) as url:
        client = _client(url, max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=f"{exp.name}:a", prompt="x")
        assert e.value.status_code == 504 and e.value.code == "timeout"
        assert 1.4 < time.monotonic() - t0 < 10
        # Each unanswered request stays in a's topic: once more than three wait (the backlog is read
        # every second), new ones are shed instead of queued.
        timed_out = 1
        with pytest.raises(openai.RateLimitError) as e:
            for _ in range(8):
                with pytest.raises(openai.InternalServerError):
                    client.completions.create(model=f"{exp.name}:a", prompt="x")
                timed_out += 1
        assert timed_out > 3
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.response.headers["x-abq-variant"] == "a"
        # b has no backlog: it is not shed (it times out, as nothing serves it).
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=f"{exp.name}:b", prompt="x")
        assert e.value.status_code == 504


def test_abq_gateway_refuses_a_public_address_without_keys_and_serves_the_sdk(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    exp = _two_variants(settings)
    cfg = write_config(exp, tmp_path)
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    r = subprocess.run(abq_cmd("gateway", "--config", str(cfg), "--host", "0.0.0.0"), capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--api-keys" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    keys = tmp_path / "keys.yaml"
    keys.write_text("acme: [sk-acme-0123456789abcdef]\n")
    keys.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        abq_cmd("gateway", "--config", str(cfg), "--port", str(port), "--api-keys", str(keys)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        with thread_worker(exp, "a"), thread_worker(exp, "b"):
            client = _client(f"http://127.0.0.1:{port}/v1", max_retries=0)

            def up():
                try:
                    return bool(client.models.list().data)
                except openai.APIConnectionError:
                    return False

            wait_until(up, 60, "abq gateway serving")
            out = client.chat.completions.create(model=exp.name, messages=[{"role": "user", "content": "hi"}])
            assert out.choices[0].message.content == "hi"
            # A second gateway on the same port: one line, exit 2, and no reply topic of its own created
            # (it printed a serving banner and exited 3, after creating its reply topic).
            taken = subprocess.run(
                abq_cmd("gateway", "--config", str(cfg), "--port", str(port), "--api-keys", str(keys), "--instance", "second"),
                capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
            )  # fmt: skip
            assert taken.returncode == 2, taken.stderr
            assert taken.stderr.strip() == f"abq: error: port {port} on 127.0.0.1 is in use; stop what listens there or pass another --port"  # fmt: skip
            from abqueue.kafka.topics import visible

            admin = admin_client(settings)
            try:
                assert f"abq.{exp.name}.replies.gateway.second" not in admin.list_topics()
            finally:
                admin.close()
            assert visible(settings, exp.response_topic)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0].decode()
    assert "sk-acme" not in log
    # SIGTERM (what Kubernetes sends) is a clean stop: it exited 143, killed by uvicorn re-raising the
    # signal after its shutdown, before the gateway closed its Kafka clients.
    assert proc.returncode == 0, log[-3000:]
    assert "gateway stopped" in log, log[-3000:]


def test_segment_overrides_match_the_documented_headers_and_never_a_forged_tenant(settings, thread_worker):
    """The README's own example (match: {user_group: beta-testers}, header x-user-group) routed by the
    weights, silently: only a literal `user_group:` header matched, which proxies drop. And a caller's
    header could overwrite the authenticated tenant in the metadata. Bodies that are not objects, or
    messages that are not, were a plain 500."""
    exp = new_experiment(variants=(("a", 100), ("b", 0)))
    exp = exp.model_copy(
        update={
            "overrides": [
                SegmentOverride(name="beta", match={"user_group": "beta-testers"}, variant="b"),
                SegmentOverride(name="tenant-beta", match={"tenant": "beta"}, variant="b"),
            ]
        }
    )
    ensure_topics(settings, exp)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp]) as url:
        client = _client(url, max_retries=0)

        def variant(key="sk-acme-0123456789abcdef", **headers):
            raw = _client(url, key=key).completions.with_raw_response.create(
                model=exp.name, prompt="x", extra_headers=headers
            )
            return raw.headers["x-abq-variant"]

        assert variant() == "a"
        assert variant(**{"x-user-group": "beta-testers"}) == "b"  # the README's example
        assert variant(**{"tenant": "beta"}) == "a" and variant(**{"x-tenant": "beta"}) == "a"  # forged: ignored
        assert variant(key="sk-beta-0123456789abcdef") == "b"  # the authenticated tenant
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/completions", body=[1], cast_to=object)
        assert e.value.code == "invalid_body"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=exp.name, messages=["hi"])
        assert "messages.0 must be an object" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # pydantic's "Value error," prefix never reaches a caller
            client.completions.create(model=exp.name, prompt="x", stop=[""])
        assert e.value.body["message"] == "'stop' sequences must not be empty strings", e.value.body


def test_a_broker_outage_during_a_request_is_a_503_in_openai_s_shape(settings, monkeypatch):
    """It was a plain 500. (The outage is injected at the client: the session's one broker cannot be
    killed under the other tests; the cluster tests kill real brokers under the client itself.)"""
    from kafka.errors import KafkaTimeoutError

    exp = _two_variants(settings)
    with serving(settings, [exp]) as url:
        from producers.client import AbqClient

        def outage(self, request, timeout=60.0, traceparent=None):
            raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")

        monkeypatch.setattr(AbqClient, "submit", outage)
        with pytest.raises(openai.InternalServerError) as e:
            _client(url, max_retries=0).completions.create(model=exp.name, prompt="x")
    assert e.value.status_code == 503 and e.value.code == "kafka_unavailable"
    assert e.value.response.headers["retry-after"] == "1"
