"""Long waits do not time out: headers and SSE pings while a streaming request waits."""

import asyncio
import random
import statistics
import time

import aiohttp
import pytest
from test_gateway import until_free

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.engine import FakeEngine

BODY = {"model": "big", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
INTERVAL = 0.1
# The longest silence a stream may see between pings: 10 intervals, room for a loaded machine's
# late timers, and still a third of the shortest wait below, which no ping at all would leave silent.
MAX_GAP = 10 * INTERVAL


@pytest.fixture
async def setup(gateway, serve_app):
    async def make(ping_interval: float = INTERVAL, max_wait: float = 1.5, **fake_knobs):
        f = FakeEngine(**fake_knobs)
        url = await serve_app(f.app())
        base, app = await gateway({"gateway": {"ping_interval_seconds": ping_interval},
                                   "queue": {"max_wait_seconds": max_wait},
                                   "backends": [{"name": "primary", "url": url}]})
        return f, base, app[GATEWAY]
    return make


async def timed_read(base, body=BODY, headers=None):
    """(status, [(seconds since send, chunk)], whole body)."""
    chunks = []
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(base + "/v1/messages", json=body, headers=headers or {}) as r:
            chunks.append((time.monotonic() - t0, b""))  # headers
            async for chunk in r.content.iter_any():
                chunks.append((time.monotonic() - t0, chunk))
            return r.status, chunks, b"".join(c for _, c in chunks)


def gaps(chunks):
    times = [0.0] + [t for t, _ in chunks]
    return [b - a for a, b in zip(times, times[1:])]


def max_gap(chunks):
    return max(gaps(chunks))


async def test_slow_prefill_gets_pings_with_no_gap_longer_than_the_interval(setup):
    f, base, gw = await setup(prefill_delay=3.0)
    status, chunks, raw = await timed_read(base)
    events = sse_events(raw)
    kinds = [e.event for e in events]
    assert status == 200
    # 30 intervals of prefill: pings at the interval, before any answer byte. A loaded machine fires
    # a timer late now and then, so the pace is the median gap and a third of the expected count;
    # no silence is longer than MAX_GAP. A gateway pinging at twice the interval fails the median.
    assert kinds.count("ping") >= 10 and kinds.index("message_start") > kinds.index("ping")
    assert all(k == "ping" for k in kinds[:kinds.index("message_start")])
    assert kinds[-1] == "message_stop"
    prefill = [g for (t, _), g in zip(chunks, gaps(chunks)) if t < 3.0]
    assert statistics.median(prefill) < 1.5 * INTERVAL, sorted(prefill)
    assert max_gap(chunks) < MAX_GAP, max_gap(chunks)


async def test_queued_stream_gets_pings_then_its_answer(setup):
    f, base, gw = await setup(max_wait=60)
    q = gw.backends["primary"].queue
    blocker = asyncio.create_task(timed_read(base, body={**BODY, "metadata": {"x_fake_mode": "stall"}}))
    while q.busy == 0:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(timed_read(base))
    await asyncio.sleep(2 * MAX_GAP)  # queued 20 intervals: pings, whatever the machine's speed
    blocker.cancel()
    status, chunks, raw = await waiting
    kinds = [e.event for e in sse_events(raw)]
    assert status == 200 and "ping" in kinds and kinds[-1] == "message_stop"
    assert max_gap(chunks) < MAX_GAP, max_gap(chunks)


async def test_failure_after_pings_is_an_sse_error_event(setup):
    # Pings at their default 10 s here: a 100 ms one could beat a loaded machine's immediate error.
    f, base, gw = await setup(ping_interval=10.0)
    status, _, raw = await timed_read(base, body={**BODY, "metadata": {"x_fake_mode": "error500"}})
    assert status == 500  # an immediate error is still a plain HTTP error
    f, base, gw = await setup(prefill_delay=0.5)
    q = gw.backends["primary"].queue
    blocker = asyncio.create_task(timed_read(base, body={**BODY, "metadata": {"x_fake_mode": "stall"}}))
    while q.busy == 0:
        await asyncio.sleep(0.01)
    status, chunks, raw = await timed_read(base)  # waits past max_wait_seconds in the queue
    events = sse_events(raw)
    assert status == 200 and events[0].event == "ping"
    assert events[-1].event == "error" and events[-1].json()["error"]["type"] == "overloaded_error"
    assert "message_start" not in [e.event for e in events]
    blocker.cancel()
    await until_free(q)


async def test_pings_off_when_interval_is_zero(gateway, serve_app):
    f = FakeEngine(prefill_delay=0.4)
    url = await serve_app(f.app())
    base, _ = await gateway({"gateway": {"ping_interval_seconds": 0}, "backends": [{"name": "p", "url": url}]})
    status, chunks, raw = await timed_read(base)
    assert "ping" not in [e.event for e in sse_events(raw)]


async def test_pings_stopping_at_any_moment_never_corrupt_the_stream(gateway, serve_app, http):
    """Pings every 1 ms, backends answering 0-6 ms after the request: the backend's first bytes
    often arrive while a ping (and the response headers) are being written. Every stream is one
    HTTP response: pings, then the backend's events whole, message_start first, one message_stop."""
    f = FakeEngine(die_on_overlap=False, capacity=64)
    url = await serve_app(f.app())
    base, app = await gateway({"gateway": {"ping_interval_seconds": 0.001},
                               "backends": [{"name": "primary", "url": url, "slots": 64}]})
    rng = random.Random(7)

    async def one():
        async with http.post(base + "/v1/messages", json=BODY) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            return await r.read()

    for _ in range(5):
        f.prefill_delay = rng.random() * 0.006
        for raw in await asyncio.gather(*[one() for _ in range(40)]):
            assert b"HTTP/1.1" not in raw  # no second response written into the body
            kinds = [e.event for e in sse_events(raw)]
            body = [k for k in kinds if k != "ping"]
            assert body[0] == "message_start" and body[-1] == "message_stop" and body.count("message_stop") == 1, kinds
            assert all(k == "ping" for k in kinds[:kinds.index("message_start")])
