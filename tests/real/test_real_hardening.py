"""Hardening against the real llama-server (SmolLM2-135M): huge request bodies sent slowly.

Bodies of about 1, 8 and 30 MB (Claude Code's real main request with its conversation padded) are
written to the gateway by hand over a raw socket, in many small writes with pauses between them,
chunked or with a Content-Length. The gateway must hand llama-server the whole body: its
count_tokens answer must equal llama-server's own count of the same bytes posted directly. While
the 30 MB body is read, parsed and forwarded, GET /health must keep answering within a second.
Past gateway.max_body_bytes a chunked body without Content-Length gets 413 request_too_large.

Clients that vanish at every stage of a request: test_real_storm and test_real_leaving.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import time
from dataclasses import dataclass

import aiohttp
import pytest

from orchestrator.conversation import fold_system_messages
from orchestrator.jsonvalues import utf8_json
from testkit.client import sample
from testkit.servers import ROOT

pytestmark = pytest.mark.real

MiB = 1024 * 1024
COUNT_PATH = "/v1/messages/count_tokens?beta=true"
MESSAGES_PATH = "/v1/messages?beta=true"

# Realistic padding: the project's own source code and prose, plus a line of multi-byte UTF-8 so
# that the writes below split characters across TCP segments and chunks.
_TEXTS: list[str] = []


def _texts() -> list[str]:
    if not _TEXTS:
        files = [ROOT / "README.md", *sorted((ROOT / "orchestrator").rglob("*.py"))]
        _TEXTS.extend(p.read_text() for p in files if p.stat().st_size > 2000)
        _TEXTS.append("Résumé of the naïve café's façade — «guillemets», 日本語のテキスト, "
                      "Ελληνικά, emoji 🚀🧪 and a zero-width joiner 👩‍💻.\n" * 40)
    return _TEXTS


def padded_body(target_bytes: int, tag: str) -> bytes:
    """Claude Code's real main request, its conversation grown to about `target_bytes` of JSON."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    texts = _texts()
    msgs = body["messages"]
    size = len(json.dumps(body, ensure_ascii=False).encode())
    i = 0
    while size < target_bytes:
        role = "assistant" if i % 2 == 0 else "user"
        text = f"[{tag} turn {i}]\n" + texts[i % len(texts)]
        msg = ({"role": role, "content": [{"type": "text", "text": text}]} if role == "assistant" or i % 4 == 1
               else {"role": role, "content": text})
        msgs.append(msg)
        size += len(json.dumps(msg, ensure_ascii=False).encode()) + 2
        i += 1
    if msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": "Given all of the above, what should I fix first?"})
    return json.dumps(body, ensure_ascii=False).encode()


# ---- a hand-written HTTP/1.1 client ------------------------------------------------------------

@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int            # body bytes written before the answer came (or all of them)
    seconds: float


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            out += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(out)
    else:
        body = await reader.read()
    return status, headers, body


def _head(port: int, path: str, *, length: int | None, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             "Accept: application/json", "Connection: close", "anthropic-version: 2023-06-01"]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_slowly(port: int, path: str, body: bytes, *, chunked: bool, rng: random.Random,
                      piece: tuple[int, int], pause: float, timeout: float = 240.0) -> RawAnswer:
    """POST `body` in many writes of random sizes within `piece`, `pause` seconds apart; the answer is
    read concurrently, so one that comes before the body is all sent (413) stops the writing."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(_read_answer(reader))
    sent = 0
    try:
        writer.write(_head(port, path, length=None if chunked else len(body)))
        while sent < len(body) and not answer.done():
            n = rng.randint(*piece)
            part = body[sent:sent + n]
            try:
                writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                await writer.drain()
            except (ConnectionError, OSError):
                break
            sent += len(part)
            await asyncio.sleep(pause)
        if sent == len(body) and chunked and not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        status, headers, data = await asyncio.wait_for(answer, timeout)
    finally:
        answer.cancel()
        writer.close()
    return RawAnswer(status, headers, data, sent, time.monotonic() - start)


async def watch_health(base: str, stop: asyncio.Event, latencies: list[float]) -> None:
    """GET /health every 100 ms; each answer's latency, as the gateway's event loop lets it through."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        while not stop.is_set():
            t = time.monotonic()
            async with s.get(base + "/health") as r:
                assert r.status == 200
                await r.read()
            latencies.append(time.monotonic() - t)
            await asyncio.sleep(0.1)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def _direct_count(llama_url: str, raw: bytes) -> tuple[int, float]:
    t = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        async with s.post(llama_url + "/v1/messages/count_tokens", data=raw,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["input_tokens"], time.monotonic() - t


# ---- big bodies, slow and chunked --------------------------------------------------------------

@pytest.mark.parametrize("size_mb, chunked, piece, pause", [
    (1, True, (4 * 1024, 28 * 1024), 0.01),
    (8, False, (24 * 1024, 72 * 1024), 0.015),
    (30, True, (16 * 1024, 112 * 1024), 0.02),
], ids=["1MB-chunked", "8MB-content-length", "30MB-chunked"])
async def test_big_body_sent_slowly_is_counted_whole_by_the_real_server(llama, gateway, size_mb, chunked,
                                                                         piece, pause):
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url}],
                               "gateway": {"count_tokens_timeout_seconds": 120, "max_body_bytes": 32 * MiB,
                                           "body_timeout_seconds": 120}})
    raw = padded_body(size_mb * 1000 * 1000, f"{size_mb}MB")
    assert size_mb * 1000 * 1000 <= len(raw) < 32 * MiB
    # The control: llama-server's own count of exactly these bytes, their system message folded as the
    # gateway sends it to a server on this machine (conversation.fold_system_messages).
    folded = fold_system_messages(json.loads(raw))
    expected, direct_s = await _direct_count(llama.url, utf8_json(folded) if folded is not None else raw)
    assert expected > len(raw) // 10

    stop, latencies = asyncio.Event(), []
    prober = asyncio.create_task(watch_health(base, stop, latencies))
    try:
        answer = await send_slowly(_port(base), COUNT_PATH, raw, chunked=chunked, rng=random.Random(size_mb),
                                   piece=piece, pause=pause)
    finally:
        stop.set()
        await prober
    print(f"\n{size_mb} MB ({len(raw)} bytes, {'chunked' if chunked else 'content-length'}): "
          f"{expected} tokens; direct count {direct_s:.1f}s; through the gateway {answer.seconds:.1f}s; "
          f"/health {len(latencies)} probes, max {max(latencies) * 1000:.0f} ms")
    assert answer.status == 200, answer.body[:500]
    assert answer.sent == len(raw)
    assert json.loads(answer.body) == {"input_tokens": expected}
    # The backend counted it, not the ~4 chars/token estimate.
    text = (await _get(base + "/metrics")).decode()
    assert _metric(text, 'orchestrator_count_tokens_total{source="backend"}') == 1
    assert _metric(text, 'orchestrator_count_tokens_total{source="estimate"}') == 0
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f}s while a {size_mb} MB body was handled"


async def _get(url: str) -> bytes:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(url) as r:
            return await r.read()


def _metric(text: str, series: str) -> float:
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    assert m, f"no series {series}"
    return float(m.group(1))


async def test_body_over_the_limit_gets_413_even_chunked_without_length(llama, gateway):
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url}],
                               "gateway": {"max_body_bytes": 2 * MiB, "count_tokens_timeout_seconds": 120}})
    raw = padded_body(3 * 1000 * 1000, "too-big")
    for path in (COUNT_PATH, MESSAGES_PATH):
        answer = await send_slowly(_port(base), path, raw, chunked=True, rng=random.Random(7),
                                   piece=(8 * 1024, 40 * 1024), pause=0.005, timeout=60)
        assert answer.status == 413, answer.body[:300]
        err = json.loads(answer.body)
        assert err["type"] == "error" and err["error"]["type"] == "request_too_large", err
        assert isinstance(err["error"]["message"], str) and err["error"]["message"]
        # Refused while the body was still arriving, not after reading all of it.
        assert 2 * MiB <= answer.sent < len(raw), answer.sent
        print(f"\n{path}: 413 after {answer.sent} of {len(raw)} bytes sent chunked, in {answer.seconds:.2f}s")
    # With a Content-Length over the limit the answer does not wait for the body.
    answer = await send_slowly(_port(base), COUNT_PATH, raw, chunked=False, rng=random.Random(8),
                               piece=(8 * 1024, 8 * 1024), pause=0.05, timeout=60)
    assert answer.status == 413 and json.loads(answer.body)["error"]["type"] == "request_too_large"
    assert answer.sent < 256 * 1024
    # And the gateway is fine afterwards: a small body is counted by the backend.
    small = json.dumps(sample("count_tokens-2.1.197.json")["body"]).encode()
    answer = await send_slowly(_port(base), COUNT_PATH, small, chunked=True, rng=random.Random(9),
                               piece=(100, 900), pause=0.001, timeout=60)
    assert answer.status == 200 and json.loads(answer.body)["input_tokens"] == (await _direct_count(llama.url, small))[0]
    text = (await _get(base + "/metrics")).decode()
    assert _metric(text, 'orchestrator_rejections_total{reason="too_large"}') == 3
