"""What the fuzzing of tests/real/test_fuzz_*.py shares: hypothesis settings (FUZZ_SCALE=5 in the
environment runs five times as many examples), an SSE stream parsed into its blocks per the WHATWG
algorithm, the checks of an Anthropic error and of one terminal event, last, and GET /health asked over
and over while a request runs, with a ticker watching the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
REQUEST_TIMEOUT = 10.0
HEALTH_LATENCY = 0.5
SYNTHETIC_LIMIT = 100 * 1024
TERMINAL = ("message_stop", "error")


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


def assert_envelope(raw: bytes, headers) -> dict:
    assert headers.get("Content-Type", "").startswith("application/json"), headers.get("Content-Type")
    body = json.loads(raw)
    assert isinstance(body, dict) and body.get("type") == "error", body
    err = body.get("error")
    assert isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str), body
    return body


_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass
class Blk:
    """One SSE block (up to and including its blank line) and the event it dispatches, if any."""

    raw: bytes
    event: str | None
    data: str | None


def sse_blocks(raw: bytes) -> tuple[list[Blk], bytes]:
    """The blocks of a whole stream per the WHATWG algorithm (a final CR ends a line), and the
    bytes after the last blank line (an unfinished block)."""
    blocks: list[Blk] = []
    start = pos = 0
    name, data = "", []
    for m in _EOL.finditer(raw):
        line, pos = raw[pos:m.start()], m.end()
        if line:
            if not line.startswith(b":"):
                f, _, v = line.decode("utf-8", "replace").partition(":")
                v = v[1:] if v.startswith(" ") else v
                if f == "event":
                    name = v
                elif f == "data":
                    data.append(v)
            continue
        blocks.append(Blk(raw[start:pos], (name or "message") if data else None,
                          "\n".join(data) if data else None))
        name, data, start = "", [], pos
    return blocks, raw[start:]


def json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None


def assert_one_terminal_last(blocks: list[Blk]) -> Blk:
    events = [b for b in blocks if b.event is not None]
    terminals = [b for b in events if b.event in TERMINAL]
    assert len(terminals) == 1, [b.event for b in events]
    assert blocks and blocks[-1] is terminals[0], "bytes after the terminal event"
    return terminals[0]


def assert_anthropic_error_event(b: Blk) -> dict:
    data = json_or_none(b.data)
    assert isinstance(data, dict) and data.get("type") == "error", b.data
    assert isinstance(data.get("error"), dict), b.data
    assert isinstance(data["error"].get("type"), str) and isinstance(data["error"].get("message"), str), b.data
    return data


async def until_free(gw, timeout: float = 30.0) -> None:  # polled: only a stuck slot reaches it
    q = gw.backends["primary"].queue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.busy == 0 and q.depth == 0 and not gw.held_slots():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"slot not free {timeout}s after the answer: busy={q.busy} depth={q.depth} "
                         f"releasing={gw.held_slots()}")


async def with_health_probes(http: aiohttp.ClientSession, base: str, coro) -> tuple[Any, float]:
    """Run `coro` while GET /health is asked over and over and a ticker watches the event loop (the
    gateway's and the client's); (its result, the longest /health or stall of the loop)."""
    task = asyncio.ensure_future(coro)
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            worst, last = max(worst, now - last), now

    tick = asyncio.create_task(ticker())
    try:
        while not task.done():
            t0 = time.monotonic()
            async with asyncio.timeout(REQUEST_TIMEOUT):
                async with http.get(base + "/health") as r:
                    await r.read()
                    assert r.status == 200
            worst = max(worst, time.monotonic() - t0)
            await asyncio.wait([task], timeout=0.02)
        return await task, worst
    finally:
        tick.cancel()
        if not task.done():
            task.cancel()


async def assert_responsive(worst: float, again, what: str) -> None:
    """The event loop did not stand still `worst` seconds; a stall is measured once more, with the
    same request (`again()`: its worst), before it counts: a machine busy with other work (2 cores)
    can stop the process now and then, a blocking call in the gateway stops it every time."""
    if worst >= HEALTH_LATENCY:
        retry = await again()
        assert retry < HEALTH_LATENCY, f"the event loop or GET /health stood still {worst:.2f}s, then " \
                                       f"{retry:.2f}s again, while {what} ran"


def one_in(draw, n: int) -> bool:
    """True about one time in n (hypothesis draws 0 from integers(0, n - 1) far more often than that)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))
