"""A pool when backends fail: waiting requests move to a live backend (when theirs goes down or
FAILED, or another comes back), connect timeouts are sent again elsewhere, unknown hold times."""

import asyncio

from aiohttp import web
from test_pool import turn

from orchestrator.backends.gateway import GATEWAY
from orchestrator.backends.health import State
from orchestrator.backends.pool import Decision, Pool
from orchestrator.slots import SlotQueue
from testkit.client import post
from testkit.engine import FakeEngine
from testkit.servers import free_port


async def _until(pred, seconds=30.0):  # polled: the bound is only reached by a broken gateway
    for _ in range(int(seconds / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def test_waiter_moves_when_its_backend_goes_failed_not_only_down(gateway, serve_app, http):
    """A request waiting for a pooled backend that goes FAILED (FATAL, or down past the grace) moves
    to the other backend, which is up: the queue's failure (529) reaches the waiter before the health
    change does, and is a move too, not an answer."""
    a, b = FakeEngine(), FakeEngine()
    urls = [await serve_app(a.app()), await serve_app(b.app())]
    base, app = await gateway({"backends": [{"name": n, "url": u, "models": ["glm-*"]} for n, u in zip("ab", urls)]})
    gw = app[GATEWAY]
    await post(http, base, turn("one", 1))
    home, other = ("a", "b") if a.requests else ("b", "a")
    fakes = {"a": a, "b": b}
    fakes[home].gate.clear()  # turn 2 holds the home's slot until the gate opens: no clock to beat
    slow = asyncio.create_task(post(http, base, {**turn("one", 2), "metadata": {"x_fake_hold": 1}}))
    assert await _until(lambda: fakes[home].in_flight == 1)
    waiting = asyncio.create_task(post(http, base, turn("one", 3)))
    assert await _until(lambda: gw.backends[home].queue.depth == 1)
    assert gw.backends[other].queue.busy == 0
    gw.backends[home].health.set(State.FAILED, "test: FATAL in supervisord")
    status, raw, _ = await asyncio.wait_for(waiting, 30)
    fakes[home].gate.set()
    await slow
    assert status == 200, f"the waiter got {status} {raw[:200]!r} instead of moving to the idle backend {other!r}"


async def test_waiter_on_a_dead_backend_moves_when_another_pool_member_comes_back(gateway, http):
    """With every backend of a pool down, a request waits on one of them; when another one comes back,
    the request moves to it at once instead of waiting for its own (or for the down grace)."""
    port_a, port_b = free_port(), free_port()  # nothing listens on either yet
    base, app = await gateway({"backends": [
        {"name": "a", "url": f"http://127.0.0.1:{port_a}", "models": ["glm-*"]},
        {"name": "b", "url": f"http://127.0.0.1:{port_b}", "models": ["glm-*"]}]})
    gw = app[GATEWAY]
    assert await _until(lambda: not gw.backends["a"].queue.is_open and not gw.backends["b"].queue.is_open)
    waiting = asyncio.create_task(post(http, base, turn("one", 1)))
    runner = None
    try:
        assert await _until(lambda: gw.backends["a"].queue.depth + gw.backends["b"].queue.depth == 1)
        stuck_on = "a" if gw.backends["a"].queue.depth else "b"
        revived = "b" if stuck_on == "a" else "a"
        fake = FakeEngine()
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port_b if revived == "b" else port_a).start()
        assert await _until(lambda: gw.backends[revived].health.state is State.READY)
        # At once, against the 300 s down grace it would wait otherwise: 30 s leave a loaded machine room.
        done, _ = await asyncio.wait({waiting}, timeout=30)
        assert waiting in done, (f"{revived!r} is up and idle for 30 s, the request still waits on the dead "
                                 f"{stuck_on!r} (depth {gw.backends[stuck_on].queue.depth})")
        assert waiting.result()[0] == 200
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()


async def test_a_busy_backend_never_seen_finishing_is_not_taken_for_an_idle_one():
    """A backend not seen finishing a request yet has no hold time of its own: it is given the pool's,
    so a long line there is not taken for a 0 s wait and a conversation does not move into it."""
    a, b = SlotQueue("a", 1), SlotQueue("b", 1)
    pool = Pool(max_wait=120.0)
    pool.served("c1", "a", 100.0)
    held = [await a.acquire(), await b.acquire()]
    waiters = [asyncio.create_task(a.acquire()) for _ in range(2)] + [asyncio.create_task(b.acquire())
                                                                    for _ in range(6)]
    await asyncio.sleep(0)
    try:
        choice = pool.choose([a, b], "c1")
        assert (choice.queue.name, choice.decision) == ("a", Decision.HIT), (
            f"moved to {choice.queue.name!r} ({choice.decision.value}): a line of {b.depth} behind a running "
            f"request of unknown length was taken as a 0 s wait, against {a.depth} on the home")
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for h in held:
            h.release()


async def test_a_connect_timeout_is_sent_again_on_the_other_backend_of_the_pool(gateway, serve_app, http):
    """A backend whose TCP/TLS connect times out was sent nothing: the request is sent again on the
    other backend of its pool (a connect timeout is like a refused connection, not a 504)."""
    async def hang(reader, writer):  # accepts TCP, never answers the TLS ClientHello
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    b = FakeEngine()
    try:
        base, app = await gateway({"backends": [
            {"name": "a", "url": f"https://127.0.0.1:{port}", "models": ["glm-*"], "connect_timeout_seconds": 0.5},
            {"name": "b", "url": await serve_app(b.app()), "models": ["glm-*"]}]})
        status, raw, _ = await asyncio.wait_for(post(http, base, turn("one", 1, stream=False)), 10)
        assert status == 200, f"{status} {raw[:300]!r}; b got {len(b.requests)} requests"
    finally:
        server.close()
