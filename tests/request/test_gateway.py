"""The gateway end to end against a fake upstream: what a real server cannot do on demand. Here what goes
in and out (bodies, headers, model names, upstream failures); its slots in test_gateway_slots, where requests
go in test_gateway_routes."""

import asyncio
import functools
import json

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.client import CLAUDE_PATH, post as post_to, sample

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


async def test_billing_header_is_stripped_the_system_message_folded_and_nothing_else_changes(gateway, fake, http):
    from orchestrator.conversation import fold_system_messages

    f, url = fake
    base, _ = await _start(gateway, url)
    body = sample("main-2.1.332.json")["body"]
    status, raw, _ = await post(http, base, body)
    assert status == 200
    sent = f.requests[-1]
    assert sent["system"] == body["system"][1:]
    # A server on this machine renders a chat template: the system message inside messages is folded.
    assert sent["messages"] == fold_system_messages(body)["messages"]
    assert {k: v for k, v in sent.items() if k not in ("system", "messages")} == {
        k: v for k, v in body.items() if k not in ("system", "messages")}


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
