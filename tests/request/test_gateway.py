"""The gateway end to end against a fake upstream: what a real server cannot do on demand."""

import asyncio
import functools
import json
import random

import aiohttp
import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.client import CLAUDE_PATH, post as post_to, sample
from testkit.engine import FakeEngine

# Every request here goes where Claude Code sends it.
post = functools.partial(post_to, path=CLAUDE_PATH)

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


async def _start(start_gateway, url, **extra):
    raw = {"backends": [{"name": "primary", "url": url, "slots": 1}], **extra}
    base, app = await start_gateway(raw)
    return base, app[GATEWAY]


def _events(raw: bytes):
    return sse_events(raw)


async def until_free(queue, timeout: float = 30.0) -> None:
    """A slot whose client or backend went away is free once the backend let go (release.py). Polled:
    the bound is reached only by a slot that is never freed."""
    for _ in range(int(timeout / 0.02)):
        if queue.busy == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue {queue.name!r} still has {queue.busy} busy slots after {timeout}s")


@pytest.mark.parametrize("data,ctype,status,needle", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1,2]", "application/json", 400, "must be a JSON object"),
    (b'{"model":"m","max_tokens":5}', "application/json", 400, "messages"),
    (b'{"model":"m","max_tokens":5,"messages":"hi"}', "application/json", 400, "messages"),
    (b'{"model":"m","max_tokens":0,"messages":[]}', "application/json", 400, "max_tokens"),
    (b'{"model":"m","max_tokens":true,"messages":[]}', "application/json", 400, "max_tokens"),
    (b'{"model":"m","max_tokens":"5","messages":[]}', "application/json", 400, "max_tokens"),
    (b'{"max_tokens":5,"messages":[]}', "application/json", 400, "model"),
    (b'{"model":"m","max_tokens":5,"messages":[]}', "text/plain", 415, "Content-Type"),
    (b'{"model":"m","max_tokens":5,"messages":[], "pad":"' + b"x" * 2000 + b'"}', "application/json", 413,
     "limit"),
    (b"\xff\xfe", "application/json", 400, "not UTF-8"),
])
async def test_bad_input_refused_before_a_slot(gateway, fake, http, data, ctype, status, needle):
    f, url = fake
    base, gw = await _start(gateway, url, gateway={"max_body_bytes": 1000})
    async with http.post(base + "/v1/messages", data=data, headers={"Content-Type": ctype}) as r:
        body = await r.json()
        assert r.status == status
    assert body["type"] == "error" and needle in body["error"]["message"]
    assert body["error"]["type"] in ("invalid_request_error", "request_too_large")
    assert f.requests == [] and gw.backends["primary"].queue.acquired_total == 0


async def test_unknown_paths_and_methods_are_anthropic_shaped(gateway, fake, http):
    base, _ = await _start(gateway, fake[1])
    async with http.get(base + "/v1/nothing") as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
    async with http.get(base + "/v1/messages") as r:
        assert r.status == 405 and (await r.json())["type"] == "error"
    for path in ("/", "/api/hello"):
        async with http.head(base + path) as r:
            assert r.status == 200
    async with http.get(base + "/health") as r:
        h = await r.json()
        assert h["backends"][0]["name"] == "primary" and h["backends"][0]["queued"] == 0
    async with http.get(base + "/v1/models") as r:
        assert (await r.json())["data"][0]["type"] == "model"
    async with http.get(base + "/metrics") as r:
        text = await r.text()
        assert "orchestrator_requests_total" in text and "orchestrator_queue_wait_seconds_bucket" in text


async def test_stream_passthrough_is_byte_faithful(gateway, fake, http):
    f, url = fake
    base, _ = await _start(gateway, url)
    body = {**MAIN, "stream": True}
    _, direct, _ = await post(http, url, body)
    status, through, headers = await post(http, base, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert through == direct
    # What reached the fake is the client's body, byte for byte, without the client's key.
    assert f.requests[-1] == body


async def test_headers_forwarded_without_client_key_and_hop_by_hop(gateway, fake, http):
    f, url = fake
    base, _ = await _start(gateway, url)
    await post(http, base, MAIN, headers={"x-api-key": "sk-secret", "Authorization": "Bearer sk-secret",
                                           "anthropic-version": "2023-06-01", "Connection": "keep-alive",
                                           "anthropic-beta": "a,b"})
    h = {k.lower(): v for k, v in f.headers[-1].items()}
    assert "x-api-key" not in h and "authorization" not in h
    assert h["anthropic-version"] == "2023-06-01" and h["anthropic-beta"] == "a,b"


async def test_only_what_a_backend_needs_of_the_clients_headers_is_forwarded(gateway, fake, http):
    """A browser's Origin and Cookie, the SDK's telemetry, Claude Code's own ids, a proxy's
    X-Forwarded-For: none of it is the backend's business."""
    f, url = fake
    base, _ = await _start(gateway, url)
    await post(http, base, MAIN, headers={
        "Origin": base, "Cookie": "session=secret", "X-Forwarded-For": "10.0.0.1",
        "x-stainless-os": "Linux", "x-claude-code-session-id": "abc", "User-Agent": "claude-cli/2.1.332",
        "anthropic-version": "2023-06-01", "anthropic-beta": "a,b", "Accept": "application/json"})
    sent = {k.lower() for k in f.headers[-1]}
    client_sent = sent - {"host", "content-length", "accept-encoding", "user-agent", "connection"}
    assert client_sent == {"content-type", "accept", "anthropic-version", "anthropic-beta"}, sent
    # aiohttp sets its own User-Agent on every request; the client's is not the one that went.
    assert dict((k.lower(), v) for k, v in f.headers[-1].items()).get("user-agent") != "claude-cli/2.1.332"
    assert f.paths[-1] == "/v1/messages?beta=true"


async def test_backend_api_key_and_opt_in_forwarding(gateway, fake, http):
    f, url = fake
    base, _ = await gateway({"backends": [{"name": "p", "url": url, "api_key": "backend-key"}]})
    await post(http, base, MAIN, headers={"x-api-key": "client"})
    assert {k.lower(): v for k, v in f.headers[-1].items()}["x-api-key"] == "backend-key"


async def test_billing_header_is_stripped_and_nothing_else_changes(gateway, fake, http):
    f, url = fake
    base, _ = await _start(gateway, url)
    body = sample("main-2.1.332.json")["body"]
    status, raw, _ = await post(http, base, body)
    assert status == 200
    sent = f.requests[-1]
    assert sent["system"] == body["system"][1:]
    assert {k: v for k, v in sent.items() if k != "system"} == {k: v for k, v in body.items() if k != "system"}


async def test_model_name_is_echoed(gateway, fake, http):
    f, url = fake
    f.answer_model = "/models/some.gguf"  # llama-server names its GGUF path
    base, _ = await _start(gateway, url)
    status, raw, _ = await post(http, base, {**MAIN, "stream": True})
    _, direct, _ = await post(http, url, {**MAIN, "stream": True})
    assert _events(raw)[0].json()["message"]["model"] == "big-model"
    # Only the first event was rewritten; every byte after it is the backend's.
    assert raw.split(b"\n\n", 1)[1] == direct.split(b"\n\n", 1)[1]
    status, raw, _ = await post(http, base, MAIN)
    assert json.loads(raw)["model"] == "big-model"


async def test_concurrent_main_requests_never_overlap(gateway, fake, http):
    f, url = fake
    f.chunk_delay = 0.005
    base, gw = await _start(gateway, url)
    results = await asyncio.gather(*[post(http, base, {**MAIN, "stream": i % 2 == 0}) for i in range(12)])
    assert [s for s, _, _ in results] == [200] * 12
    assert not f.crashed and f.max_in_flight == 1 and f.generations_finished == 12
    for _, raw, h in results:
        if h["Content-Type"].startswith("text/event-stream"):
            assert _events(raw)[-1].event == "message_stop"
        else:
            assert json.loads(raw)["stop_reason"] == "end_turn"
    q = gw.backends["primary"].queue
    assert q.busy == 0 and q.acquired_total == q.released_total == 12


async def test_server_dying_mid_stream_ends_with_error_event_and_frees_slot(gateway, fake, http):
    f, url = fake
    f.mode = "die_midstream"
    base, gw = await _start(gateway, url)
    status, raw, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200
    events = _events(raw)
    assert events[-1].event == "error"
    assert events[-1].json()["error"]["type"] == "overloaded_error"
    assert not any(e.event == "message_stop" for e in events)
    assert f.generations_started == 1  # never re-sent once bytes reached the client
    await until_free(gw.backends["primary"].queue)
    f.mode = "ok"
    for _ in range(50):  # health polling reopens the queue
        status, raw, _ = await post(http, base, {**MAIN, "stream": True})
        if status == 200:
            break
    assert _events(raw)[-1].event == "message_stop"


async def test_failure_before_any_byte_is_retried_once_transparently(gateway, fake, http):
    f, url = fake
    f.fail_next = 1
    base, gw = await _start(gateway, url)
    status, raw, _ = await post(http, base, {**MAIN, "stream": True})
    assert status == 200 and _events(raw)[-1].event == "message_stop"
    assert len(f.requests) == 2 and f.generations_finished == 1
    assert gw.backends["primary"].queue.busy == 0


async def test_persistent_failure_gives_up_with_529_naming_backend(gateway, fake, http):
    f, url = fake
    f.fail_next = 100
    base, gw = await _start(gateway, url)
    status, raw, headers = await post(http, base, MAIN)
    assert status == 529 and "retry-after" in headers
    err = json.loads(raw)["error"]
    assert err["type"] == "overloaded_error" and "primary" in err["message"]
    assert len(f.requests) == 3
    await until_free(gw.backends["primary"].queue)


@pytest.mark.parametrize("mode,status,etype", [("error500", 500, "api_error"),
                                               ("error400", 400, "invalid_request_error")])
async def test_backend_openai_errors_become_anthropic(gateway, fake, http, mode, status, etype):
    f, url = fake
    f.mode = mode
    base, gw = await _start(gateway, url)
    for stream in (False, True):
        s, raw, _ = await post(http, base, {**MAIN, "stream": stream})
        body = json.loads(raw)
        assert s == status and body["type"] == "error" and body["error"]["type"] == etype
    assert len(f.requests) == 2 and gw.backends["primary"].queue.busy == 0


async def test_client_disconnect_while_streaming_closes_upstream(gateway, fake, http):
    f, url = fake
    f.chunk_delay = 0.2
    f.parts = 50
    base, gw = await _start(gateway, url)
    async with http.post(base + "/v1/messages", json={**MAIN, "stream": True}) as r:
        await r.content.readany()
    # Leaving the block closes our connection mid-stream.
    for _ in range(100):
        await asyncio.sleep(0.05)
        if f.in_flight == 0 and gw.backends["primary"].queue.busy == 0:
            break
    assert f.cancelled == 1 and f.generations_finished == 0
    assert gw.backends["primary"].queue.busy == 0


async def test_client_disconnect_while_queued_leaves_queue(gateway, fake, http):
    f, url = fake
    f.mode = "stall"
    base, gw = await _start(gateway, url)
    q = gw.backends["primary"].queue
    first = asyncio.create_task(post(http, base, MAIN))
    while q.busy == 0:
        await asyncio.sleep(0.01)
    queued = asyncio.create_task(post(http, base, MAIN))
    while q.depth == 0:
        await asyncio.sleep(0.01)
    queued.cancel()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if q.depth == 0:
            break
    assert q.depth == 0 and len(f.requests) == 1
    first.cancel()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if q.busy == 0:
            break
    assert q.busy == 0 and q.acquired_total == q.released_total
    assert f.cancelled == 1


async def test_queue_bounds_answer_529_with_retry_after(gateway, fake, http):
    f, url = fake
    f.mode = "stall"
    # The waiter must still wait when the third request comes: 2 s leave a loaded machine room (0.3 s
    # was a race with sending it).
    base, gw = await _start(gateway, url, queue={"max_depth": 1, "max_wait_seconds": 2,
                                                 "retry_after_seconds": 4})
    q = gw.backends["primary"].queue
    running = asyncio.create_task(post(http, base, MAIN))
    while q.busy == 0:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(post(http, base, MAIN))
    while q.depth == 0:
        await asyncio.sleep(0.01)
    status, raw, headers = await post(http, base, MAIN)
    assert status == 529 and headers["retry-after"] == "4" and "full" in json.loads(raw)["error"]["message"]
    status, raw, headers = await waiting
    assert status == 529 and "waited" in json.loads(raw)["error"]["message"]
    running.cancel()
    await until_free(q)


async def test_a_failed_backend_refuses_as_backend_failed_not_queue_full(gateway, fake, http):
    """A backend that will not come back (FATAL) refuses its waiters and newcomers with 529, counted
    under its own reason on the dashboard, not as a full queue."""
    from orchestrator.backends.health import State

    f, url = fake
    f.mode = "stall"
    base, gw = await _start(gateway, url)
    q = gw.backends["primary"].queue
    running = asyncio.create_task(post(http, base, MAIN))
    while q.busy == 0:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(post(http, base, MAIN))
    while q.depth == 0:
        await asyncio.sleep(0.01)
    gw.backends["primary"].health.set(State.FAILED, "test: FATAL in supervisord")
    status, raw, _ = await waiting
    assert status == 529 and "failed" in json.loads(raw)["error"]["message"]
    status, _, _ = await post(http, base, MAIN)
    assert status == 529
    rejections = gw.metrics.rejections
    assert rejections.labels("backend_failed")._value.get() == 2
    assert rejections.labels("queue_full")._value.get() == 0
    running.cancel()
    await until_free(q)


async def test_background_goes_to_small_model_never_to_primary(gateway, serve_app, http):
    big, small = FakeEngine(), FakeEngine()
    big_url, small_url = await serve_app(big.app()), await serve_app(small.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": big_url},
                                           {"name": "small", "url": small_url, "role": "background"}],
                              "routing": {"background": "small"}})
    big.prefill_delay = 5  # the background answers below take milliseconds: room for a loaded machine
    main = asyncio.create_task(post(http, base, {**MAIN, "stream": True}))
    async with asyncio.timeout(30):  # the main request is in the primary's prefill
        while big.generations_started == 0:
            await asyncio.sleep(0.01)
    for name in ("title-2.1.332.json", "topic-2.0.77.json", "warmup-2.0.77.json"):
        status, raw, _ = await post(http, base, sample(name)["body"])
        assert status == 200 and _events(raw)[-1].event == "message_stop"
    assert not main.done()  # background answers did not wait behind the main request
    assert (await main)[0] == 200
    assert len(big.requests) == 1 and len(small.requests) == 3


async def test_background_synthetic_when_small_model_down(gateway, fake, http):
    f, url = fake
    base, app = await gateway({"backends": [{"name": "primary", "url": url},
                                            {"name": "small", "url": "http://127.0.0.1:9", "role": "background"}],
                               "routing": {"background": "small"}})
    gw = app[GATEWAY]
    for _ in range(50):
        if not gw.backends["small"].health.up:
            break
        await asyncio.sleep(0.05)
    status, raw, _ = await post(http, base, sample("title-2.1.332.json")["body"])
    events = _events(raw)
    text = events[2].json()["delta"]["text"]
    assert status == 200 and "title" in json.loads(text)
    assert f.requests == []


async def test_synthetic_non_streaming_and_count_probe(gateway, fake, http):
    f, url = fake
    base, _ = await _start(gateway, url)
    body = {**sample("topic-2.0.77.json")["body"], "stream": False}
    status, raw, _ = await post(http, base, body)
    msg = json.loads(raw)
    assert status == 200 and msg["type"] == "message" and msg["model"] == "claude-haiku-4-5-20251001"
    json.loads("{" + msg["content"][0]["text"])
    probe = sample("count-probe-2.1.197.json")["body"]
    status, raw, _ = await post(http, base, probe)
    _, counted, _ = await post(http, base, probe, path="/v1/messages/count_tokens?beta=true")
    assert json.loads(raw)["usage"]["input_tokens"] == json.loads(counted)["input_tokens"] > 1000
    assert f.requests == []  # neither the probe nor the count took a generation


async def test_count_tokens_burst_never_takes_a_slot(gateway, fake, http):
    f, url = fake
    f.mode = "stall"
    base, gw = await _start(gateway, url)
    running = asyncio.create_task(post(http, base, MAIN))
    while gw.backends["primary"].queue.busy == 0:
        await asyncio.sleep(0.01)
    body = sample("count_tokens-2.1.197.json")["body"]
    bodies = [{**body, "tools": [{"name": f"t{i % 5}", "input_schema": {"type": "object"}}]} for i in range(25)]
    t0 = asyncio.get_running_loop().time()
    results = await asyncio.gather(*[post(http, base, b, path="/v1/messages/count_tokens?beta=true")
                                     for b in bodies])
    # Not behind the stalled slot (an hour): a bound wide enough for any loaded machine.
    assert asyncio.get_running_loop().time() - t0 < 30
    assert all(s == 200 and json.loads(r)["input_tokens"] > 0 for s, r, _ in results)
    assert f.count_calls == 5  # the same content was counted once
    assert gw.backends["primary"].queue.depth == 0
    running.cancel()


async def test_count_tokens_falls_back_to_estimate_when_backend_slow_or_down(gateway, fake, http):
    f, url = fake
    f.count_delay = 5
    base, _ = await _start(gateway, url, gateway={"count_tokens_timeout_seconds": 0.2})
    body = sample("count_tokens-2.1.197.json")["body"]
    status, raw, _ = await post(http, base, body, path="/v1/messages/count_tokens")
    assert status == 200 and 100 < json.loads(raw)["input_tokens"] < 1000
    base2, _ = await gateway({"backends": [{"name": "p", "url": "http://127.0.0.1:9"}]})
    status, raw, _ = await post(http, base2, body, path="/v1/messages/count_tokens")
    assert status == 200 and json.loads(raw)["input_tokens"] > 0


@pytest.mark.parametrize("seed", range(4))
async def test_randomised_chaos_leaves_no_stuck_slot(gateway, serve_app, seed):
    """Random stream/non-stream, disconnects at random moments, upstream deaths and
    errors: afterwards every slot is free and the gateway still answers."""
    rng = random.Random(seed)
    f = FakeEngine(chunk_delay=0.002, die_on_overlap=True)
    url = await serve_app(f.app())
    base, gw = await _start(gateway, url, queue={"max_depth": 20, "max_wait_seconds": 5})
    modes = ["ok", "ok", "ok", "die_midstream", "error500"]

    async def one(i):
        mode = rng.choice(modes)
        async with aiohttp.ClientSession() as s:
            try:
                async with asyncio.timeout(rng.choice([0.01, 0.05, 0.2, 10])):
                    async with s.post(base + "/v1/messages", json={**MAIN, "stream": rng.random() < 0.7,
                                                                        "metadata": {"x_fake_mode": mode}}) as r:
                        await r.read()
            except (TimeoutError, aiohttp.ClientError):
                pass

    await asyncio.gather(*[one(i) for i in range(40)])
    q = gw.backends["primary"].queue
    for _ in range(200):
        if q.busy == 0 and q.depth == 0 and f.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert q.busy == 0 and q.depth == 0 and q.acquired_total == q.released_total
    assert not f.crashed and f.max_in_flight == 1
    f.mode = "ok"
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.post(base + "/v1/messages", json=MAIN) as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert r.status == 200


async def test_process_event_endpoint_needs_the_listeners_secret(gateway, fake, http, tmp_path):
    secret = tmp_path / "events.secret"
    secret.write_text("s3cret-of-the-listener\n")
    base, _ = await _start(gateway, fake[1], supervisor={"events_secret_file": str(secret)})
    event = {"program": "llama-x", "state": "FATAL"}
    for headers in ({}, {"X-Orchestrator-Secret": "guess"}, {"X-Orchestrator-Secret": ""}):
        async with http.post(base + "/internal/process-event", json=event, headers=headers) as r:
            assert r.status == 403 and (await r.json())["error"]["type"] == "permission_error"
    async with http.post(base + "/internal/process-event", json=event,
                         headers={"X-Orchestrator-Secret": "s3cret-of-the-listener"}) as r:
        assert r.status == 404 and "llama-x" in (await r.json())["error"]["message"]


async def test_pool_spreads_requests_and_a_retry_moves_to_a_healthy_backend(gateway, serve_app, http):
    a, b = FakeEngine(chunk_delay=0.01), FakeEngine(chunk_delay=0.01)
    url_a, url_b = await serve_app(a.app()), await serve_app(b.app())
    base, app = await gateway({"backends": [{"name": "a", "url": url_a, "models": ["glm-*"]},
                                            {"name": "b", "url": url_b, "models": ["glm-*"]}]})
    body = {**MAIN, "model": "glm-5", "stream": True}
    # Eight conversations (one conversation would stay on one backend: test_pool.py).
    results = await asyncio.gather(*[post(http, base, {**body, "messages": [{"role": "user", "content": f"hi {i}"}]})
                                     for i in range(8)])
    assert all(s == 200 and _events(r)[-1].event == "message_stop" for s, r, _ in results)
    assert len(a.requests) >= 2 and len(b.requests) >= 2  # both served
    assert a.max_in_flight == 1 and b.max_in_flight == 1 and not (a.crashed or b.crashed)
    # "a" fails before answering: the retry goes to "b" instead of waiting for "a".
    a.fail_next = 1
    before_b = len(b.requests)
    status, raw, _ = await post(http, base, body)
    assert status == 200 and _events(raw)[-1].event == "message_stop"
    assert len(b.requests) == before_b + 1


async def test_health_says_what_holds_a_busy_slot(gateway, fake, http):
    """A client that left mid-answer: its slot stays busy until the backend lets go, and /health
    says so (held_after_client_left), apart from sends in progress."""
    f, url = fake
    # The backend lingers until the test has seen the slot held: no race with a loaded machine.
    f.chunk_delay, f.linger, f.linger_ends = 0.2, 600, asyncio.Event()
    base, app = await _start(gateway, url)
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/messages", json={**MAIN, "stream": True}) as r:
            await r.content.readany()
            async with http.get(base + "/health") as h:
                during = (await h.json())["backends"][0]
    assert during["busy"] == 1 and during["sending"] == 1 and during["held_after_client_left"] == 0
    # Waited for (the gateway sees the client gone) while the backend lingers.
    async with asyncio.timeout(60):
        while True:
            async with http.get(base + "/health") as h:
                held = (await h.json())["backends"][0]
            if held["held_after_client_left"] == 1:
                break
            await asyncio.sleep(0.05)
    assert held["busy"] == 1 and held["sending"] == 0 and held["held_after_client_left"] == 1
    f.linger_ends.set()
    await until_free(app.backends["primary"].queue)
    async with http.get(base + "/health") as h:
        after = (await h.json())["backends"][0]
    assert after["busy"] == 0 and after["held_after_client_left"] == 0


async def test_a_big_bodys_prompt_blocks_are_hashed_off_the_event_loop(gateway, fake, http, monkeypatch):
    """Hashing a conversation's prompt blocks costs ~7 ms a MB (31 ms for 8 MB, measured): for a
    body past INLINE_BYTES it runs in a thread, not on the loop that relays every other stream."""
    import threading

    from orchestrator import conversation

    seen: list[bool] = []
    hash_blocks = conversation.blocks

    def recording(body):
        seen.append(threading.current_thread() is threading.main_thread())
        return hash_blocks(body)

    monkeypatch.setattr(conversation, "blocks", recording)
    f, url = fake
    base, _ = await _start(gateway, url)
    small = {**MAIN, "messages": [{"role": "user", "content": "hello"}]}
    big = {**MAIN, "messages": [{"role": "user", "content": "x" * 200_000}]}
    for body in (small, big):
        status, _, _ = await post(http, base, body)
        assert status == 200
    assert seen == [True, False]
