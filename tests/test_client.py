"""AbqClient shared by threads, on its own: replies read by one caller's thread reach the other."""

import queue
import threading
from types import SimpleNamespace

from producers.client import AbqClient
from producers.replies import Reply
from schemas import InferenceRequest, InferenceResponse


def _reply(rid: str, tag: str | None = "me", output: str = "x") -> Reply:
    response = InferenceResponse(
        request_id=rid, experiment="e", variant="a", model="m", outputs=[output], finish_reason="stop",
        timings={"enqueued": 1.0, "dequeued": 1.0, "finished": 2.0}, worker_id="w", caller_tag=tag,
    )  # fmt: skip
    return Reply(response, None, 0, 0)


def test_a_reply_read_by_another_thread_before_its_caller_waits_is_kept_for_it():
    arrived, handed_out = queue.Queue(), threading.Event()

    class Listener:
        def poll(self, timeout_ms=100):
            try:
                reply = arrived.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                return
            yield reply
            if reply.response.request_id == "mine":
                handed_out.set()

    class Publisher:  # the reply comes back at once, and is read by the other thread before submit waits
        def publish(self, request, traceparent=None):
            arrived.put(_reply(request.id, request.caller_tag))
            assert handed_out.wait(5), "the other thread did not read the reply"
            return request, SimpleNamespace(get=lambda timeout=None: None)

    client = _bookkeeping(Listener(), Publisher())
    other = threading.Thread(target=client.wait, args=({"theirs"}, 5.0))
    other.start()
    reply = client.submit(InferenceRequest(id="mine", experiment="e", routing_key="k", prompt="p"), timeout=5)
    arrived.put(_reply("theirs"))
    other.join(5)
    assert reply.response.request_id == "mine"
    assert not client._waiting and not client._arrived  # nothing kept once nobody waits


def _bookkeeping(listener, publisher) -> AbqClient:
    client = AbqClient.__new__(AbqClient)  # the reply bookkeeping alone: no Kafka behind it
    client.listener, client.publisher = listener, publisher
    client._bookkeeping()
    client.max_buffered_parts = 512
    client.tag, client.accept_untagged, client.reply_to = "me", False, None
    return client


def test_a_client_takes_only_replies_tagged_for_it():
    """Another caller used the same id: its answer (another tag, or none) is not this client's."""

    class Listener:
        def poll(self, timeout_ms=100):
            yield _reply("1", tag="someone-else", output="theirs")
            yield _reply("1", tag=None, output="untagged")
            yield _reply("1", tag="me", output="mine")

    client = _bookkeeping(Listener(), None)
    got = client.wait({"1"}, timeout=2)
    assert got["1"].response.outputs == ["mine"]
    client.accept_untagged = True
    assert client.wait({"1"}, timeout=2)["1"].response.outputs == ["untagged"]
