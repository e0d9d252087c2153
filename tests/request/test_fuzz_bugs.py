"""Gateway bugs found by the fuzzing of test_fuzz_bodies and test_fuzz_streams (all fixed): minimal
reproductions, each against the real gateway app and a fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from typing import Any

import pytest
from test_fuzz_bodies import BodyEnv

from orchestrator.backends.gateway import GATEWAY
from orchestrator.errors import InvalidRequest
from orchestrator.request.synthetic import instance_of
from testkit.client import claude_title
from testkit.engine import FakeEngine
from testkit.fuzz import HEALTH_LATENCY, REQUEST_TIMEOUT, SYNTHETIC_LIMIT, assert_envelope, with_health_probes

# The failing examples' bodies are large; hypothesis says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def bug_env(gateway, serve_app, http):
    fake = FakeEngine(die_on_overlap=False, answer_model="/models/fake-model.gguf", parts=2)
    url = await serve_app(fake.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    return BodyEnv(base, app[GATEWAY], fake, http)


async def post_raw(env: BodyEnv, path: str, data: bytes, **headers: str) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        async with env.http.post(env.base + path, data=data,
                                 headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, r.headers, await r.read()


def title_request(schema: dict, text: str = "fix the login bug", stream: bool = False) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}


# Found by this fuzzing (fixed): a JSON string holding a lone surrogate ("\ud800", valid JSON, accepted by the gateway's
# parser) makes the gateway answer 500 "internal gateway error": counting.{_prepare,content_key}
# (count_tokens, count probes), routing.forwarded_body (billing line dropped, max_tokens clamped) and
# request/forward.py (the model name set back in a non-streaming answer) encode it with
# json.dumps(ensure_ascii=False).encode(), which raises UnicodeEncodeError. Expected: a 400 from
# check_request, as llama-server itself answers such a body ("surrogate U+D800..U+DBFF must be
# followed by U+DC00..U+DFFF"), or at least not a 500.
@pytest.mark.parametrize("path,data", [
    ("/v1/messages/count_tokens", rb'{"model":"m","messages":[{"role":"user","content":"\ud800"}]}'),
    ("/v1/messages", rb'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],'
                     rb'"system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=1;"},'
                     rb'{"type":"text","text":"\ud800"}]}'),
    ("/v1/messages", rb'{"model":"\ud800","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'),
], ids=["count_tokens", "billing-line-rewrite", "model-rename"])
async def test_lone_surrogate_is_not_a_500(bug_env, path, data):
    status, headers, raw = await post_raw(bug_env, path, data)
    assert status in (200, 400), (status, raw)


# Found by this fuzzing (fixed): a body whose Content-Encoding (gzip, deflate) does not match its bytes is a 500 "internal
# gateway error": aiohttp raises web_protocol.RequestPayloadError (not an HttpProcessingError) from
# request.content.readany(), which bodies.read_body does not catch. Expected: 400.
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_request_is_refused(bug_env, encoding):
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(MAIN).encode(),
                                          **{"Content-Encoding": encoding})
    assert status == 415, (status, raw)  # no compressed request is taken
    assert_envelope(raw, headers)


# Found by this fuzzing (fixed): a synthetic answer was not bounded by the size of what it repeats. synthetic.instance_of
# charges its 64 KB budget one character per value, but a const or enum value, or the title, is
# copied whole, minItems times: a 1 KB title request makes a multi-megabyte answer (40 MB for
# const "y" * 2000; a 30 MB body, within max_body_bytes, makes gigabytes), built and serialised on the
# event loop. The title itself (make_title) is unbounded too: a 300 KB word makes a 300 KB title.
@pytest.mark.parametrize("items", [{"const": "y" * 200}, {"enum": ["y" * 200]}, {"type": "string"}],
                         ids=["const", "enum", "title"])
async def test_synthetic_answer_is_bounded(bug_env, items):
    schema = {"type": "object", "properties": {"title": {"type": "string"},
                                               "x": {"type": "array", "minItems": 20000, "items": items}}}
    # Since issue 28 no such schema is housekeeping: it is work, and the model answers it.
    body = title_request(schema, text="Refactor the authentication middleware thoroughly")
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(body).encode())
    assert status == 200 and len(bug_env.fake.requests) == 1
    # What the gateway itself would make of it stays bounded (the background model's fallback uses it).
    try:
        answer = instance_of(schema, "t" * 300_000)
    except InvalidRequest:
        return
    assert len(json.dumps(answer)) < SYNTHETIC_LIMIT


# Found by this fuzzing (fixed): synthetic.user_words searched the user's text with <session>(.*?)</session> (re.S), which is
# quadratic in the number of "<session>" without a closing tag: a 60 KB title request holding
# "<session>" 7000 times blocks the event loop for seconds (every other client, /health included,
# waits), and a 1 MB one for minutes. Expected: a linear search (find the tag, then str.find the end).
async def test_session_tag_search_is_linear(bug_env):
    body = claude_title("<session>" * 7000)
    (status, headers, raw), worst = await with_health_probes(
        bug_env.http, bug_env.base, post_raw(bug_env, "/v1/messages", json.dumps(body).encode()))
    assert status == 200
    assert worst < HEALTH_LATENCY, f"the event loop stood still {worst:.2f}s while one title request was answered"


# Found by this fuzzing (fixed): a small gzip body that inflates to gigabytes blocks every client for seconds. The gateway
# accepts "Content-Encoding: gzip" on requests and aiohttp inflates it in its protocol callback, on
# the event loop. read_body's 413 comes at 32 MB (gateway.max_body_bytes), but aiohttp then goes on
# reading, and inflating, what the client had already sent, before it closes the connection. Here
# 2 MB inflating to 2 GB stops the event loop ~2.2 s in all, 1-1.3 s at a stretch, on 2 cores (the
# same body sent by curl: GET /health waits ~2.5 s).
# Expected: refuse a Content-Encoding on requests (Claude Code sends none), or close at the 413.
async def test_gzip_bomb_is_refused_before_inflating(bug_env):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(b'{"model":"m","messages":[],"pad":"') + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"a" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes each time after a full flush
    bomb = head + block * 2000  # 2 MB inflating to 2 GB (no gzip trailer: never reached)

    async def send_all_at_once() -> bytes:
        # Like curl: the whole body is written without waiting for the answer.
        host, port = bug_env.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                         f"\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode() + bomb)
            async with asyncio.timeout(30):
                await writer.drain()
                answer = await reader.readuntil(b"\r\n\r\n")
                with contextlib.suppress(ConnectionError):
                    await reader.read()  # the connection stays open until the gateway closes it, as with curl
                return answer
        finally:
            writer.close()

    head_raw, worst = await with_health_probes(bug_env.http, bug_env.base, send_all_at_once())
    assert head_raw.startswith(b"HTTP/1.1 415"), head_raw  # refused before any byte is inflated
    assert worst < HEALTH_LATENCY, f"the event loop stood still {worst:.2f}s while one {len(bomb)}-byte " \
                                   f"request was refused"


# Found by this fuzzing (fixed): a body in UTF-16 or UTF-32 (json.loads detects the encoding of bytes) passes the
# gateway's checks and is forwarded as it is, taking the main slot, to a backend that reads UTF-8
# JSON only (RFC 8259 8.1; llama-server answers 400 "parse error ... invalid literal"); the client
# gets the backend's error. Expected: a 400 before any slot.
async def test_utf16_body_is_refused(bug_env):
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(MAIN).encode("utf-16"))
    assert bug_env.fake.not_utf8 == [] and status == 400, (status, raw)
