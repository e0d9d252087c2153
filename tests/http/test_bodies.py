"""Request bodies: whole however they arrive, bounded in bytes and time, every field the gateway reads checked."""

import asyncio
import json
import time

import pytest
from conftest import gateway_with

from orchestrator.conversation import fold_system_messages
from orchestrator.errors import InvalidRequest
from orchestrator.http.bodies import check_request, check_schema
from testkit.client import sample

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


async def raw_request(base: str, head: str, parts: list[bytes], delay: float = 0.0,
                      read_timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Send a request in several TCP writes (delay between them); return (status, headers, body)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        try:
            writer.write(head.encode())
            await writer.drain()
            for part in parts:
                await asyncio.sleep(delay)
                writer.write(part)
                await writer.drain()
        except ConnectionError:
            pass  # the gateway answered (413, 408) and closed before the client finished
        async with asyncio.timeout(read_timeout):
            data = await reader.read()
    finally:
        writer.close()
    head_raw, _, body = data.partition(b"\r\n\r\n")
    lines = head_raw.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + rest[:size], rest[size + 2:]
    return out


def _split(data: bytes, n: int) -> list[bytes]:
    step = max(1, len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


async def health_latencies(http, base: str, n: int, pause: float) -> list[float]:
    """How long /health takes, n times: what any other client waits while the gateway is busy."""
    gaps = []
    for _ in range(n):
        t = time.monotonic()
        async with http.get(base + "/health") as r:
            assert r.status == 200
        gaps.append(time.monotonic() - t)
        await asyncio.sleep(pause)
    return gaps


def padded_main_body(target_bytes: int) -> dict:
    """Claude Code's real main request with its conversation grown to about `target_bytes`."""
    body = sample("main-2.1.332.json")["body"]
    turn = ("def handler(request):\n    # a long file the user pasted\n    return compute(request) * 2\n" * 40)
    messages = list(body["messages"])
    size, i = len(json.dumps(body)), 0
    while size < target_bytes:
        messages.append({"role": "assistant" if i % 2 else "user", "content": f"turn {i}\n{turn}"})
        size += len(json.dumps(messages[-1])) + 2
        i += 1
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "and now?"})
    return {**body, "messages": messages}


async def test_a_body_in_two_writes_20ms_apart_is_read_whole(gateway, fake, http):
    f, url = fake
    base, _ = await gateway_with(gateway, url)
    data = json.dumps(MAIN).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    status, _, body = await raw_request(base, head, [data[:40], data[40:]], delay=0.02)
    assert status == 200, body
    assert f.requests[-1] == MAIN


@pytest.mark.parametrize("size", [1 << 20, 8 << 20])
async def test_real_claude_code_bodies_of_megabytes_arrive_whole_in_many_writes(gateway, fake, size):
    """Padded to 1 MB and 8 MB, sent chunked in 64 KB writes: the backend gets the client's
    body byte for byte but for the documented billing-line rewrite."""
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    body = {**padded_main_body(size), "stream": False}
    data = json.dumps(body).encode()
    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in _split(data, len(data) // 65536)] + [b"0\r\n\r\n"]
    head = ("POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    status, _, answer = await raw_request(base, head, chunks, delay=0.001)
    assert status == 200, answer[:300]
    sent = f.requests[-1]
    # The documented rewrites only: the billing line dropped, the system message folded (a server on
    # this machine), which re-serialises the body off the event loop.
    assert sent["messages"] == fold_system_messages(body)["messages"] and sent["tools"] == body["tools"]
    assert sent["system"] == body["system"][1:]
    assert gw.backends["primary"].queue.busy == 0


async def test_a_30_mb_conversation_goes_through_intact_and_the_loop_keeps_serving(gateway, fake, http):
    f, url = fake
    base, _ = await gateway_with(gateway, url)
    body = {**padded_main_body(30 << 20), "stream": True}
    data = json.dumps(body).encode()
    assert len(data) < 32 << 20

    async def big():
        async with http.post(base + "/v1/messages", data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    (status, raw), gaps = await asyncio.gather(big(), health_latencies(http, base, 40, 0.02))
    assert status == 200 and b"message_stop" in raw
    assert f.requests[-1]["messages"] == fold_system_messages(body)["messages"]
    # Parsing and re-serialising 30 MB happen in a thread: /health never waits long on them. One
    # parse, timed here on the same (maybe busy) machine, is the unit: a parse holds the GIL, so the
    # loop may wait for one, never for the whole of the gateway's work on the body.
    t = time.monotonic()
    json.loads(data)
    one_parse = time.monotonic() - t
    assert max(gaps) < max(1.0, 4 * one_parse), (gaps, one_parse)


async def test_over_the_limit_is_413_even_chunked_without_content_length(gateway, fake):
    f, url = fake
    base, gw = await gateway_with(gateway, url, max_body_bytes=100_000)
    data = json.dumps({**MAIN, "pad": "x" * 200_000}).encode()
    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in _split(data, 20)] + [b"0\r\n\r\n"]
    head = ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    status, headers, body = await raw_request(base, head, chunks)
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["type"] == "request_too_large" and "max_body_bytes" in body.decode()
    assert f.requests == [] and gw.backends["primary"].queue.acquired_total == 0


async def test_a_body_that_stops_arriving_gets_408_in_time(gateway, fake):
    f, url = fake
    base, _ = await gateway_with(gateway, url, body_timeout_seconds=0.3)
    data = json.dumps(MAIN).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    t = time.monotonic()
    # Without the body timeout the read would hang until read_timeout: bounds 100x the 0.3 s it
    # takes, so a loaded machine is never taken for a gateway that waits forever.
    status, _, body = await raw_request(base, head, [data[:10]], read_timeout=60)
    assert status == 408 and json.loads(body)["error"]["type"] == "timeout_error"
    assert "body_timeout_seconds" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t < 30 and f.requests == []


@pytest.mark.parametrize("patch,field", [
    ({"system": 5}, "system"),
    ({"system": [{"type": "text", "text": 1}]}, "system.0.text"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [7]}]}, "messages.0.content.0"),
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": ["x"]}, "tools.0"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"output_config": []}, "output_config"),
    ({"output_config": {"format": "json"}}, "output_config.format"),
    ({"output_config": {"format": {"type": "json_schema", "schema": [1]}}}, "output_config.format.schema"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"properties": [1]}}}},
     "output_config.format.schema.properties"),
    ({"output_config": {"format": {"type": "json_schema",
                                   "schema": {"properties": {"title": {"minLength": "9"}}}}}},
     "output_config.format.schema.properties.title.minLength"),
    ({"max_tokens": 2.5}, "max_tokens"),
])
async def test_wrong_types_are_400s_naming_the_field(gateway, fake, http, patch, field):
    base, _ = await gateway_with(gateway, fake[1])
    async with http.post(base + "/v1/messages", json={**MAIN, **patch}) as r:
        err = (await r.json())["error"]
        assert r.status == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith(field + ":"), err["message"]


async def test_deep_nesting_and_nan_are_400_not_500(gateway, fake, http):
    base, _ = await gateway_with(gateway, fake[1])
    deep = b'{"model":"m","max_tokens":5,"messages":[],"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for data in (deep, b'{"model":"m","max_tokens":5,"messages":[],"t":NaN}'):
        async with http.post(base + "/v1/messages", data=data, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_a_title_like_schema_asking_for_more_is_work_for_the_model_and_nothing_is_made_up(gateway, fake, http):
    """Claude Code's title asks for {title} alone. A schema with a `title` and more (a 200 MB string, 2 MB of
    arrays) is another client's work: it reaches the model, and the gateway builds no answer of its own
    (5446c05 answered any such schema itself, its size bounded only by a 400)."""
    f, url = fake
    base, _ = await gateway_with(gateway, url)
    title = sample("title-2.1.332.json")["body"]
    fmt = title["output_config"]["format"]
    title_prop = {"title": {"type": "string"}}
    for i, schema in enumerate(({"type": "object", "required": ["title", "x"],
                                 "properties": {**title_prop, "x": {"type": "string", "minLength": 200_000_000}}},
                                {"type": "object", "required": ["title", "x"], "properties": {**title_prop, "x": {
                                    "type": "array", "minItems": 256, "items": {
                                        "type": "array", "minItems": 256, "items": {"type": "string", "minLength": 64}}}}})):
        body = {**title, "model": "claude-haiku-4-5", "stream": False,
                "output_config": {**title["output_config"], "format": {**fmt, "schema": schema}}}
        async with http.post(base + "/v1/messages", json=body) as r:
            assert r.status == 200 and len(await r.read()) < 10_000
        assert len(f.requests) == i + 1 and f.requests[-1]["output_config"]["format"]["schema"] == schema


def test_check_schema_bounds_depth():
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="nested deeper"):
        check_schema(schema, "s")


def test_real_samples_pass_the_checks():
    for name in ("main-2.1.332.json", "title-2.1.332.json", "topic-2.0.77.json", "warmup-2.0.77.json",
                 "count-probe-2.1.197.json"):
        check_request(sample(name)["body"], needs_max_tokens=True)
    check_request(sample("count_tokens-2.1.197.json")["body"], needs_max_tokens=False)


async def test_a_million_tiny_blocks_are_refused_without_stalling_the_loop(gateway, fake, http):
    """Checking and re-serialising a million blocks holds the interpreter for a second (found by review)."""
    base, _ = await gateway_with(gateway, fake[1])
    blocks = [{"type": "text", "text": "a"}] * 150_000
    data = json.dumps({**MAIN, "messages": [{"role": "user", "content": blocks}]}).encode()

    async def send():
        async with http.post(base + "/v1/messages", data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    (status, err), gaps = await asyncio.gather(send(), health_latencies(http, base, 20, 0.01))
    assert status == 400 and "content blocks" in err["error"]["message"]
    assert max(gaps) < 0.5, gaps
