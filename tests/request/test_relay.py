"""The relay: tolerant of how a backend frames its stream, faithful to its bytes, one terminal event,
whole answers or errors; and a vanished client's slot held until the backend lets go."""

import asyncio
import json

import pytest
from test_gateway import until_free

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.client import post
from testkit.engine import FakeEngine, Reply
from testkit.sse import sse_message

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


class Scripted:
    """The fake engine's script: /v1/messages answered with exactly the bytes it is given, in the
    writes given; a Content-Length promising more than was sent ends in a dropped connection."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.status = 200
        self.headers = {"Content-Type": "text/event-stream"}
        self.content_length: int | None = None
        self.delay = 0.0
        self.calls = 0

    def __call__(self, body: dict, headers) -> Reply:
        self.calls += 1
        sent = dict(self.headers)
        if self.content_length is not None:
            sent["Content-Length"] = str(self.content_length)
        short = self.content_length is not None and self.content_length > sum(map(len, self.writes))
        return Reply([x for w in self.writes for x in (w, self.delay)], self.status, sent,
                     close_after=0 if short else None)


@pytest.fixture
async def scripted(serve_app, gateway):
    s = Scripted()
    url = await serve_app(FakeEngine(script=s, die_on_overlap=False).app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    return s, base, app[GATEWAY]


def _stream(model="gguf/path/model.gguf") -> bytes:
    return b"".join(sse_message(["Hello", " world"], model=model))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("split", [1, 7, 10_000])
async def test_any_framing_is_relayed_in_the_backends_own_bytes(scripted, http, eol, split):
    s, base, gw = scripted
    raw = _stream().replace(b"\n", eol)
    s.writes = [raw[i:i + split] for i in range(0, len(raw), split)]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200
    events = sse_events(got)
    assert [e.event for e in events][-1] == "message_stop"
    assert events[0].json()["message"]["model"] == "big-model"  # the one documented rewrite
    first_end = raw.index(eol + eol) + 2 * len(eol)
    assert got.endswith(raw[first_end:])  # everything after message_start, byte for byte
    assert s.calls == 1
    await until_free(gw.backends["primary"].queue)


async def test_comments_and_fields_pass_and_events_after_the_terminal_one_do_not(scripted, http):
    s, base, _ = scripted
    events = sse_message(["a"], model="big-model")
    s.writes = [b":\n\n", events[0], b"id: 7\nretry: 100\n" + events[1], *events[2:],
                b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"late\"}}\n\n"]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200 and got == b"".join(s.writes[:-1])
    assert [e.event for e in sse_events(got)].count("message_stop") == 1 and b"late" not in got


@pytest.mark.parametrize("bad", [b"[1,2]", b'"text"', b"3", b"null", b"not json", b"{\"cut\":"])
async def test_an_event_that_is_not_a_json_object_ends_the_stream_with_one_error(scripted, http, bad):
    s, base, gw = scripted
    events = sse_message(["a", "b", "c"], model="big-model")
    s.writes = [*events[:3], b"event: content_block_delta\ndata: " + bad + b"\n\n", *events[3:]]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200
    kinds = [e.event for e in sse_events(got)]
    assert kinds[-1] == "error" and "message_stop" not in kinds and kinds.count("error") == 1
    assert "not a JSON object" in sse_events(got)[-1].json()["error"]["message"]
    assert got.startswith(b"".join(events[:3]))
    await until_free(gw.backends["primary"].queue)


async def test_a_9_mb_event_passes_and_a_17_mb_one_is_an_error_not_both(scripted, http):
    s, base, _ = scripted
    events = sse_message(["x"], model="big-model")
    big = json.dumps({"type": "content_block_delta", "index": 0,
                      "delta": {"type": "text_delta", "text": "y" * (9 << 20)}}).encode()
    s.writes = [*events[:2], b"event: content_block_delta\ndata: " + big + b"\n\n", *events[2:]]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    kinds = [e.event for e in sse_events(got)]
    assert status == 200 and kinds[-1] == "message_stop" and "error" not in kinds and len(got) > 9 << 20
    huge = b"event: content_block_delta\ndata: " + b"z" * (17 << 20) + b"\n\n"
    s.writes = [*events[:2], *[huge[i:i + (1 << 20)] for i in range(0, len(huge), 1 << 20)], *events[2:]]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    kinds = [e.event for e in sse_events(got)]
    assert status == 200 and kinds[-1] == "error" and "message_stop" not in kinds and kinds.count("error") == 1
    assert "16777216 bytes" in sse_events(got)[-1].json()["error"]["message"]


async def test_llama_servers_error_event_is_put_in_anthropic_shape(scripted, http):
    s, base, _ = scripted
    events = sse_message(["a"], model="big-model")
    s.writes = [*events[:3], b'event: error\ndata: {"code":500,"message":"slot crashed","type":"server_error"}\n\n']
    _, got, _ = await post(http, base, {**MAIN, "stream": True})
    last = sse_events(got)[-1]
    assert last.event == "error"
    assert last.json() == {"type": "error", "error": {"type": "api_error", "message": "backend: slot crashed"}}


async def test_a_stream_without_message_stop_ends_with_exactly_one_error(scripted, http):
    s, base, gw = scripted
    events = sse_message(["a", "b"], model="big-model")
    s.writes = [*events[:4], events[4][:10]]  # a cut, unfinished last event
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    kinds = [e.event for e in sse_events(got)]
    assert status == 200 and kinds[-1] == "error" and kinds.count("error") == 1
    assert got.startswith(b"".join(events[:4])) and events[4][:10] not in got[len(b"".join(events[:4])):]
    assert s.calls == 1  # answer bytes reached the client: never sent twice


async def test_upstream_retry_after_reaches_the_client(scripted, http):
    s, base, _ = scripted
    s.status, s.headers = 429, {"Content-Type": "application/json", "Retry-After": "17"}
    s.writes = [b'{"error":{"code":429,"message":"busy","type":"rate_limit_error"}}']
    status, got, headers = await post(http, base, MAIN)
    assert status == 429 and headers["retry-after"] == "17"
    assert json.loads(got)["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream,ctype,body", [
    (True, "application/json", b'{"type":"message"}'),
    (True, "text/html", b"<html>proxy login</html>"),
    (False, "text/html", b"<html>proxy login</html>"),
    (False, "application/json", b"[1,2,3]"),
])
async def test_a_200_that_is_not_what_was_asked_for_is_a_502(scripted, http, stream, ctype, body):
    s, base, gw = scripted
    s.headers, s.writes = {"Content-Type": ctype}, [body]
    status, got, _ = await post(http, base, {**MAIN, "stream": stream})
    assert status == 502 and json.loads(got)["error"]["type"] == "api_error"
    await until_free(gw.backends["primary"].queue)


async def test_a_large_non_streaming_answer_is_relayed_whole(scripted, http):
    s, base, _ = scripted
    text = "lorem ipsum " * 50_000  # 600 KB
    answer = json.dumps({"id": "m", "type": "message", "role": "assistant", "model": "big-model",
                         "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                         "usage": {"input_tokens": 1, "output_tokens": 2}}).encode()
    s.headers = {"Content-Type": "application/json"}
    s.writes, s.delay = [answer[i:i + 4096] for i in range(0, len(answer), 4096)], 0.001
    status, got, _ = await post(http, base, MAIN)
    assert status == 200 and json.loads(got)["content"][0]["text"] == text


async def test_a_non_streaming_answer_cut_short_is_never_a_200(scripted, http):
    s, base, gw = scripted
    answer = json.dumps({"type": "message", "content": [{"type": "text", "text": "x" * 100_000}]}).encode()
    s.headers, s.content_length = {"Content-Type": "application/json"}, len(answer)
    s.writes = [answer[:50_000]]
    status, got, _ = await post(http, base, MAIN)
    assert status == 529 and "mid-answer" in json.loads(got)["error"]["message"]
    assert s.calls == 3  # retried like any failure before a byte reached the client, then given up
    await until_free(gw.backends["primary"].queue)


# ---- a vanished client's slot ------------------------------------------------------------------

async def test_a_vanished_clients_slot_waits_for_the_backend_to_let_go(serve_app, gateway, http):
    """The fake keeps generating for 0.6 s after its client left and crashes on overlap: the next
    request must not reach it before then."""
    f = FakeEngine(chunk_delay=0.05, parts=40, linger=0.6)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    q = app[GATEWAY].backends["primary"].queue

    async def vanish():
        async with http.post(base + "/v1/messages", json={**MAIN, "stream": True}) as r:
            await r.content.readany()  # mid-stream
            r.close()

    await vanish()
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200 and sse_events(got)[-1].event == "message_stop"
    assert not f.crashed and f.max_in_flight == 1 and f.cancelled == 1
    await until_free(q)
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    count = [line for line in text.splitlines()
             if line.startswith('orchestrator_slot_release_wait_seconds_count{backend="primary",result="idle"}')]
    assert count and float(count[0].rsplit(" ", 1)[1]) == 1


async def test_without_slots_the_slot_is_freed_when_the_connection_closes(serve_app, gateway, http):
    # An answer of 60 s: a slot freed only at its end is told from one freed at the close by a bound
    # that leaves a loaded machine room.
    f = FakeEngine(chunk_delay=0.05, parts=1200, slots_endpoint=False)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    async with http.post(base + "/v1/messages", json={**MAIN, "stream": True}) as r:
        await r.content.readany()
        r.close()
    await until_free(app[GATEWAY].backends["primary"].queue, timeout=20)


async def test_a_storm_of_vanishing_clients_never_overlaps_two_generations(serve_app, gateway, http):
    """Hundreds of clients, each gone at a random moment (queued, in prefill, mid-stream, waiting for a
    non-streaming answer, or never); the fake lingers 0.1 s after a client leaves and dies on overlap."""
    import random

    rng = random.Random(8)
    f = FakeEngine(chunk_delay=0.003, parts=10, prefill_delay=0.02, linger=0.1)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}], "queue": {"max_depth": 400}})
    q = app[GATEWAY].backends["primary"].queue
    outcomes = {"complete": 0, "gone": 0}

    async def client(i: int) -> None:
        body = {**MAIN, "stream": rng.random() < 0.7, "messages": [{"role": "user", "content": f"q{i}"}]}
        # About the backend's pace (20 a second): some leave while queued, many while being served.
        leave_after = rng.choice([None, None, rng.uniform(0, 0.1), rng.uniform(0, 0.1), rng.uniform(0, 2)])
        await asyncio.sleep(rng.uniform(0, 10))
        task = asyncio.ensure_future(post(http, base, body))
        done, _ = await asyncio.wait([task], timeout=leave_after)
        if not done:
            task.cancel()
            outcomes["gone"] += 1
            return
        status, got, _ = task.result()
        assert status == 200
        last = sse_events(got)[-1].event if body["stream"] else json.loads(got)["stop_reason"]
        assert last in ("message_stop", "end_turn")
        outcomes["complete"] += 1

    await asyncio.gather(*[client(i) for i in range(200)])
    await until_free(q, timeout=20)
    # How many of the storm's clients leave while the backend generates depends on the machine's pace
    # (a loaded one gets fewer there: 3 of 200 seen), so it is not asserted. Four more leave there for
    # certain, and the invariants below hold after them too: each leaves once its
    # request is in the backend's prefill, with the next one queued behind it.
    for i in range(4):
        f.prefill_delay = 30
        leaving = asyncio.ensure_future(post(http, base, {**MAIN, "messages": [{"role": "user", "content": f"l{i}"}]}))
        async with asyncio.timeout(30):
            while f.in_flight == 0:
                await asyncio.sleep(0.01)
        behind = asyncio.ensure_future(post(http, base, {**MAIN, "messages": [{"role": "user", "content": f"b{i}"}]}))
        async with asyncio.timeout(30):
            while q.depth == 0:
                await asyncio.sleep(0.01)
        f.prefill_delay = 0.02
        leaving.cancel()
        assert (await behind)[0] == 200
    await until_free(q, timeout=20)
    assert not f.crashed and f.max_in_flight == 1, "two generations overlapped on the backend"
    assert q.depth == 0 and q.acquired_total == q.released_total
    assert outcomes["gone"] > 40 and outcomes["complete"] > 40 and f.cancelled > 3, (outcomes, f.cancelled)
    status, _, _ = await post(http, base, MAIN)
    assert status == 200


async def test_a_client_gone_after_its_grant_is_counted_in_slot(serve_app, gateway, http):
    f = FakeEngine(chunk_delay=0.05, parts=40)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    for stream in (True, False):
        task = asyncio.ensure_future(post(http, base, {**MAIN, "stream": stream}))
        while f.in_flight == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until_free(app[GATEWAY].backends["primary"].queue)
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    assert 'orchestrator_client_disconnects_total{stage="in_slot"} 2.0' in text
    assert 'orchestrator_client_disconnects_total{stage="queued"} 0.0' in text


async def test_two_slots_with_two_abandoned_requests_never_take_a_third(serve_app, gateway, http):
    """A, B abandoned mid-stream; A lingers 2 s on the backend, B 0.1 s. When B lets go, A's slot must
    stay held: another abandoned request is not a request the backend may run (found by review)."""
    f = FakeEngine(chunk_delay=0.05, parts=60, capacity=2)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url, "slots": 2}]})

    async def vanish(linger: float):
        async with http.post(base + "/v1/messages",
                             json={**MAIN, "stream": True, "metadata": {"x_fake_linger": linger}}) as r:
            await r.content.readany()
            r.close()

    await asyncio.gather(vanish(2.0), vanish(0.1))
    results = await asyncio.gather(*[post(http, base, {**MAIN, "stream": True}) for _ in range(2)])
    assert all(s == 200 for s, _, _ in results)
    assert not f.crashed and f.max_in_flight <= 2, f.max_in_flight
    await until_free(app[GATEWAY].backends["primary"].queue)


async def test_a_backends_own_key_goes_with_slots_and_count_tokens(serve_app, gateway, http):
    f = FakeEngine(chunk_delay=0.05, parts=20)
    url = await serve_app(f.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url, "api_key": "backend-key-123"}]})
    async with http.post(base + "/v1/messages", json={**MAIN, "stream": True}) as r:
        await r.content.readany()
        r.close()
    await until_free(app[GATEWAY].backends["primary"].queue)
    async with http.post(base + "/v1/messages/count_tokens", json={"model": "m", "messages": MAIN["messages"]}) as r:
        assert r.status == 200
    assert f.slots_headers and all(h.get("x-api-key") == "backend-key-123" for h in f.slots_headers)
    assert f.count_headers[-1].get("x-api-key") == "backend-key-123"


@pytest.mark.parametrize("answer", [b"{}", b'{"object":"chat.completion","choices":[]}',
                                    b'{"type":"error","error":{"type":"api_error","message":"boom"}}'])
async def test_a_200_json_that_is_not_a_message_is_a_502(scripted, http, answer):
    s, base, _ = scripted
    s.headers, s.writes = {"Content-Type": "application/json"}, [answer]
    status, got, _ = await post(http, base, MAIN)
    assert status == 502 and json.loads(got)["type"] == "error" and b'"model"' not in got


def _tool_stream(partials: list[str]) -> list[bytes]:
    def ev(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    return [ev("message_start", {"type": "message_start", "message": {
                "id": "m", "type": "message", "role": "assistant", "content": [], "model": "big-model",
                "usage": {"input_tokens": 5, "output_tokens": 0}}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "t1", "name": "Read", "input": {}}}),
            *[ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "input_json_delta", "partial_json": p}}) for p in partials],
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                 "usage": {"output_tokens": 9}}),
            ev("message_stop", {"type": "message_stop"})]


@pytest.mark.parametrize("partials,whole", [
    (['{"file_path"', ': "/a.py"}'], True), ([], True),            # an object; no input streamed
    (['[{"file_path": "/a.py"}]'], False), (['"{\\"a\\": 1}"'], False), (['{"cut": '], False)])
async def test_a_tool_call_whose_input_is_not_an_object_ends_in_one_error(scripted, http, partials, whole):
    """vLLM's tool parser with a small model streamed a forced call's input as a list or a string
    (docs/vllm-cpu.md): the client would run the tool with it; it gets one error instead."""
    s, base, gw = scripted
    s.writes = _tool_stream(partials)
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    kinds = [e.event for e in sse_events(got)]
    assert status == 200
    if whole:
        assert got.endswith(b"".join(s.writes[1:])) and kinds[-1] == "message_stop"
    else:
        assert kinds[-1] == "error" and kinds.count("error") == 1 and "content_block_stop" not in kinds, kinds
        assert "tool call whose input is not a JSON object" in sse_events(got)[-1].json()["error"]["message"]
    await until_free(gw.backends["primary"].queue)


@pytest.mark.parametrize("capacity, figures", [(1, {"input_tokens": 40, "cache_read_input_tokens": 2}),
                                               (2, {"input_tokens": 0, "cache_read_input_tokens": 0})])
async def test_an_answer_without_message_start_gets_one_with_the_engines_figures(serve_app, gateway, http,
                                                                                capacity, figures):
    # llama-server holds back a first token that is half a UTF-8 character, and with it message_start.
    s = Scripted()
    engine = FakeEngine(script=s, die_on_overlap=False, capacity=capacity, slot_prompt=(40, 2))
    base, app = await gateway({"backends": [{"name": "primary", "url": await serve_app(engine.app())}]})
    events = sse_message(["😀", " hi"], model="gguf/path/model.gguf")
    s.writes = [*events[1:3], events[0], *events[3:]]  # and a late one of its own: not passed on
    events = [events[0], *events[1:3], *events[3:]]
    status, got, _ = await post(http, base, {**MAIN, "stream": True})
    kinds = [e.event for e in sse_events(got)]
    assert status == 200 and kinds[0] == "message_start" and kinds[1:] == [e.event for e in sse_events(b"".join(events[1:]))]
    start = sse_events(got)[0].json()["message"]
    assert start["model"] == "big-model" and start["id"].startswith("msg_") and start["content"] == []
    assert start["usage"] == {**figures, "output_tokens": 0}  # two slots, none busy: whose? unknown
    assert got.endswith(b"".join(events[1:]))  # the backend's own events, byte for byte
    await until_free(app[GATEWAY].backends["primary"].queue)
