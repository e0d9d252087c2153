"""The listening socket: protocol refusals in the envelope, slow clients dropped, connections bounded."""

import asyncio
import json
import time

import pytest
from conftest import gateway_with
from test_bodies import raw_request

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


def _envelope(status: int, headers: dict, body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    parsed = json.loads(body)
    assert parsed["type"] == "error" and isinstance(parsed["error"]["message"], str)
    return parsed["error"]


@pytest.mark.parametrize("head,status", [
    ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + "a" * 20000 + "\r\n\r\n", 431),
    ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-" + "a" * 20000 + ": 1\r\n\r\n", 431),
    ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\n\r\n", 400),
    ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ("BREW /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    ("POST /" + "a" * 20000 + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
    ("GET /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 405),
    ("\x16\x03\x01 garbage\r\n\r\n", 501),  # TLS to the plain port
    ("POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
])
async def test_protocol_refusals_are_anthropic_shaped(gateway, fake, head, status):
    base, _ = await gateway_with(gateway, fake[1])
    got, headers, body = await raw_request(base, head, [])
    assert got == status
    err = _envelope(got, headers, body)
    assert err["type"] == "invalid_request_error"


async def test_a_slowloris_is_dropped_and_others_are_served_meanwhile(gateway, fake, http):
    base, _ = await gateway_with(gateway, fake[1], header_timeout_seconds=0.5)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()

    async def drip():
        for ch in "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ":
            writer.write(ch.encode())
            await writer.drain()
            await asyncio.sleep(0.05)
        while not reader.at_eof():
            writer.write(b"a")
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    # Others are served while it drips.
    for _ in range(5):
        async with http.post(base + "/v1/messages", json=MAIN) as r:
            assert r.status == 200
    # A deadline renewed by each byte would let it drip forever: the bounds only tell that from
    # the 0.5 s deadline, with room for a loaded machine.
    async with asyncio.timeout(60):
        data = await reader.read()
    elapsed = time.monotonic() - started
    dripping.cancel()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ") and b"header_timeout_seconds" in data
    assert 0.4 < elapsed < 30


async def test_a_connection_that_sends_nothing_is_closed_too(gateway, fake):
    base, _ = await gateway_with(gateway, fake[1], header_timeout_seconds=0.3)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_a_body_upload_is_not_cut_by_the_header_timeout(gateway, fake):
    """The header deadline ends with the headers: a slow body is the body timeout's business."""
    f, url = fake
    base, _ = await gateway_with(gateway, url, header_timeout_seconds=0.2, body_timeout_seconds=10)
    data = json.dumps(MAIN).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    parts = [data[i:i + 10] for i in range(0, len(data), 10)]
    status, _, _ = await raw_request(base, head, parts, delay=0.1)
    assert status == 200 and f.requests[-1] == MAIN


async def test_connections_past_the_limit_get_503_and_the_others_keep_working(gateway, fake, http):
    base, _ = await gateway_with(gateway, fake[1], max_connections=3)
    host, port = base.removeprefix("http://").split(":")
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
    await asyncio.sleep(0.05)
    got, headers, body = await raw_request(base, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [])
    assert got == 503 and headers["retry-after"] == "1"
    assert "max_connections" in _envelope(got, headers, body)["message"]
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.1)
    async with http.get(base + "/health") as r:
        assert r.status == 200
    async with http.get(base + "/metrics") as r:
        assert 'orchestrator_rejections_total{reason="too_many_connections"} 1.0' in await r.text()
