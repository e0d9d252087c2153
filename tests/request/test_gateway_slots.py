"""The gateway against a fake upstream, its slots: a client leaving while streamed to or queued, the
queue's bounds, a failed backend, random chaos, and what /health says of a busy slot."""

import asyncio
import json
import random

import aiohttp
import pytest
from test_gateway import MAIN, _start, post, until_free

from testkit.engine import FakeEngine


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

    async def one_running(max_wait: float):
        """A gateway of one slot and one place in line, its slot taken by a request that never ends."""
        base, gw = await _start(gateway, url, queue={"max_depth": 1, "max_wait_seconds": max_wait,
                                                     "retry_after_seconds": 4})
        q = gw.backends["primary"].queue
        running = asyncio.create_task(post(http, base, MAIN))
        while q.busy == 0:
            await asyncio.sleep(0.01)
        return base, q, running

    # Full: the waiter waits as long as the test needs (no race with sending the third request).
    base, q, running = await one_running(600)
    waiting = asyncio.create_task(post(http, base, MAIN))
    while q.depth == 0:
        await asyncio.sleep(0.01)
    status, raw, headers = await post(http, base, MAIN)
    assert status == 529 and headers["retry-after"] == "4" and "full" in json.loads(raw)["error"]["message"]
    waiting.cancel()
    running.cancel()
    await until_free(q)
    # Waited too long: on a gateway of its own, one waiter and its short bound, nothing to race.
    base, q, running = await one_running(0.3)
    status, raw, headers = await post(http, base, MAIN)
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


async def test_health_says_what_holds_a_busy_slot(gateway, fake, http):
    """A client that left mid-answer: its slot stays busy until the backend lets go, and /health
    says so (held_after_client_left), apart from sends in progress."""
    f, url = fake
    # The backend lingers until the test has seen the slot held: no race with a loaded machine.
    # Its answer is held after the first event (the fake's gate) until the client has left: no stream
    # for a loaded machine to finish before /health is read.
    f.linger, f.linger_ends = 600, asyncio.Event()
    f.gate.clear()
    base, app = await _start(gateway, url)
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/messages", json={**MAIN, "stream": True, "metadata": {"x_fake_hold": 1}}) as r:
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
    f.gate.set()
    f.linger_ends.set()
    await until_free(app.backends["primary"].queue)
    async with http.get(base + "/health") as h:
        after = (await h.json())["backends"][0]
    assert after["busy"] == 0 and after["held_after_client_left"] == 0
