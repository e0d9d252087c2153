"""A pool of backends for one model: each conversation back where its cache is; moves, failover."""

import asyncio

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.backends.health import State
from orchestrator.backends.pool import AffinityMap, Decision, Pool
from orchestrator.conversation import conversation_key
from orchestrator.metrics import AFFINITY_DECISIONS
from orchestrator.slots import SlotQueue
from testkit.client import post
from testkit.engine import FakeEngine


def turn(conv: str, n: int, stream: bool = True) -> dict:
    """Turn n of conversation `conv`: the same system, tools and first message every turn."""
    messages = [{"role": "user", "content": f"task of {conv}"}]
    for i in range(1, n):
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"more {i}"}]
    return {"model": "glm-5", "max_tokens": 20, "stream": stream,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=%d;" % n},
                       {"type": "text", "text": "You are a coding agent."}],
            "messages": messages}


def test_decisions_are_the_metrics_labels():
    assert tuple(d.value for d in Decision) == AFFINITY_DECISIONS


def test_a_conversation_keeps_its_key_across_turns_and_billing_lines():
    assert conversation_key(turn("a", 1)) == conversation_key(turn("a", 5))
    assert conversation_key(turn("a", 1)) != conversation_key(turn("b", 1))


def test_the_map_forgets_the_least_recently_used():
    m = AffinityMap(max_entries=2)
    m.set("one", "a")
    m.set("two", "b")
    assert m.get("one") == "a"  # now the most recent
    m.set("three", "a")
    assert m.get("two") is None and m.get("one") == "a" and len(m) == 2


async def test_choose_stays_moves_when_down_or_slow_and_prefers_a_fresh_backend():
    a, b = SlotQueue("a", 1), SlotQueue("b", 1)
    pool = Pool(max_wait=10.0)
    assert pool.choose([a, b], "c1").decision is Decision.NEW
    pool.served("c1", "a", 4.0)
    held = await a.acquire()  # "a" busy with someone else's turn
    c = pool.choose([a, b], "c1")
    assert (c.queue, c.decision) == (a, Decision.HIT)  # one turn ahead: 4 s expected, under 10 s
    waiters = [asyncio.create_task(a.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    c = pool.choose([a, b], "c1")
    assert (c.queue, c.decision) == (b, Decision.MOVED_BUSY)  # 4 rounds x 4 s = 16 s > 10 s
    a.hold()
    c = pool.choose([a, b], "c1")
    assert (c.queue, c.decision) == (b, Decision.MOVED_DOWN)
    b.hold()
    assert pool.choose([a, b], "c1").queue is a  # all down: wait for its own
    a.open(), b.open()
    # A new conversation goes to the backend home to fewer conversations when loads are equal.
    pool.served("c2", "a", 1.0)
    held.release()
    for w in waiters:
        (await w).release()
    assert pool.choose([a, b], "c3").queue is b
    assert pool.choose([b], "c1").decision is Decision.MOVED_GONE


async def _pool(gateway, serve_app, *fakes, **routing):
    urls = [await serve_app(f.app()) for f in fakes]
    base, app = await gateway({"backends": [{"name": n, "url": u, "models": ["glm-*"]}
                                            for n, u in zip("ab", urls)],
                               "routing": routing})
    return base, app[GATEWAY]


async def until(pred, seconds: float = 30.0) -> None:
    """Wait for a condition, not for a clock: polled, with a bound only a broken gateway reaches."""
    async with asyncio.timeout(seconds):
        while not pred():
            await asyncio.sleep(0.01)


def _decisions(gw, backend):
    return {d: gw.metrics.affinity.labels(backend, d)._value.get() for d in AFFINITY_DECISIONS}


async def test_each_conversation_returns_to_its_backend(gateway, serve_app, http):
    a, b = FakeEngine(), FakeEngine()
    base, gw = await _pool(gateway, serve_app, a, b)
    for n in range(1, 5):
        for conv in ("one", "two"):
            assert (await post(http, base, turn(conv, n)))[0] == 200
    firsts = [sorted({r["messages"][0]["content"] for r in fake.requests}) for fake in (a, b)]
    # Two conversations, two backends, each conversation on one backend for all four turns.
    assert sorted(firsts) == [["task of one"], ["task of two"]]
    assert len(a.requests) == len(b.requests) == 4
    hits = sum(_decisions(gw, x)["hit"] for x in "ab")
    assert hits == 6 and sum(_decisions(gw, x)["new"] for x in "ab") == 2
    async with http.get(base + "/health") as r:
        pool = (await r.json())["pool"]
    assert pool["conversations"] == 2 and pool["homes"] == {"a": 1, "b": 1}


async def test_least_busy_when_affinity_is_off(gateway, serve_app, http):
    a, b = FakeEngine(), FakeEngine()
    base, gw = await _pool(gateway, serve_app, a, b, affinity=False)
    for n in range(1, 4):
        for conv in ("one", "two"):
            assert (await post(http, base, turn(conv, n)))[0] == 200
    # One after another, both free: the first backend takes them all, and the two swap its cache.
    assert len(a.requests) == 6 and b.requests == []
    assert gw.pool is None


async def test_a_conversation_moves_when_its_backend_is_down_and_stays_moved(gateway, serve_app, http):
    a, b = FakeEngine(), FakeEngine()
    base, gw = await _pool(gateway, serve_app, a, b)
    await post(http, base, turn("one", 1))
    home = "a" if a.requests else "b"
    other = "b" if home == "a" else "a"
    fakes = {"a": a, "b": b}
    # Down, as its own health poll finds it (set by hand, a poll already under way would undo it).
    fakes[home].loading = True
    gw.backends[home].health.poke()
    await until(lambda: gw.backends[home].health.state is State.LOADING)
    for n in (2, 3):
        assert (await post(http, base, turn("one", n)))[0] == 200
    assert _decisions(gw, other)["moved_down"] == 1 and _decisions(gw, other)["hit"] == 1
    # Back up: the conversation stays where its cache now is; a new one goes to the fresh backend.
    fakes[home].loading = False
    gw.backends[home].health.set(State.READY)
    await post(http, base, turn("one", 4))
    await post(http, base, turn("new", 1))
    assert [r["messages"][0]["content"] for r in fakes[home].requests] == ["task of one", "task of new"]
    assert len(fakes[other].requests) == 3


async def test_a_waiting_request_moves_when_its_backend_goes_down(gateway, serve_app, http):
    a, b = FakeEngine(), FakeEngine()
    base, gw = await _pool(gateway, serve_app, a, b)
    await post(http, base, turn("one", 1))
    home, other = ("a", "b") if a.requests else ("b", "a")
    fakes = {"a": a, "b": b}
    # Turn 2 holds the home's slot until its gate opens (no clock a loaded machine could beat: a 1 s
    # prefill here failed one busy run); turn 3 (a retry, a second window: anything) waits behind it.
    fakes[home].gate.clear()
    slow = asyncio.create_task(post(http, base, {**turn("one", 2), "metadata": {"x_fake_hold": 1}}))
    await until(lambda: fakes[home].in_flight == 1)
    waiting = asyncio.create_task(post(http, base, turn("one", 3)))
    await until(lambda: gw.backends[home].queue.depth == 1)
    assert not waiting.done()
    gw.backends[home].health.set(State.DOWN, "test: it died")
    status, raw, _ = await asyncio.wait_for(waiting, 30)  # moved at once, not after the 300 s down grace
    assert status == 200 and b"event: message_stop" in raw
    assert gw.backends[home].queue.depth == 0  # it left the dead backend's line
    assert [r["messages"][-1]["content"] for r in fakes[other].requests] == ["more 2"]
    gw.backends[home].health.set(State.READY)
    fakes[home].gate.set()
    assert (await slow)[0] == 200  # the one already sent finished on its own backend
    assert gw.backends["a"].queue.busy == gw.backends["b"].queue.busy == 0
    assert gw.backends["a"].queue.acquired_total == gw.backends["a"].queue.released_total
    assert gw.backends["b"].queue.acquired_total == gw.backends["b"].queue.released_total


async def test_a_client_leaving_while_its_pooled_request_waits_frees_nothing_twice(gateway, serve_app, http):
    a, b = FakeEngine(prefill_delay=0.5), FakeEngine(prefill_delay=0.5)
    base, gw = await _pool(gateway, serve_app, a, b)
    tasks = [asyncio.create_task(post(http, base, turn(f"c{i}", 1))) for i in range(6)]
    await asyncio.sleep(0.1)
    for t in tasks[2:4]:
        t.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(1 for d in done if isinstance(d, tuple) and d[0] == 200) == 4
    for _ in range(100):
        if gw.backends["a"].queue.busy == gw.backends["b"].queue.busy == 0:
            break
        await asyncio.sleep(0.05)
    for q in (b.queue for b in gw.backends.values()):
        assert q.busy == 0 and q.depth == 0 and q.acquired_total == q.released_total
    assert a.max_in_flight == 1 and b.max_in_flight == 1


@pytest.mark.parametrize("bound,moved", [(0.05, True), (60, False)])
async def test_a_busy_home_is_left_only_past_the_wait_bound(gateway, serve_app, http, bound, moved):
    a, b = FakeEngine(), FakeEngine()
    base, gw = await _pool(gateway, serve_app, a, b, affinity_max_wait_seconds=bound)
    fakes = {"a": a, "b": b}
    await post(http, base, turn("one", 1))
    home = "a" if a.requests else "b"
    fakes[home].prefill_delay = 0.5
    await post(http, base, turn("one", 2))  # holds its slot 0.5 s: the mean hold time rises
    sent = len(a.requests) + len(b.requests)
    busy = asyncio.create_task(post(http, base, turn("other", 1)))  # new: the free backend...
    await until(lambda: len(a.requests) + len(b.requests) == sent + 1)
    # ... so make the home busy with a turn of its own conversation (held until its gate opens: no
    # clock to beat), then send the next turn.
    fakes[home].gate.clear()
    first = asyncio.create_task(post(http, base, {**turn("one", 3), "metadata": {"x_fake_hold": 1}}))
    await until(lambda: len(a.requests) + len(b.requests) == sent + 2)
    following = asyncio.create_task(post(http, base, turn("one", 4)))
    if not moved:  # it waits at home, behind the held turn
        await until(lambda: gw.backends[home].queue.depth == 1)
    else:
        await until(lambda: following.done())
    fakes[home].gate.set()
    status, _, _ = await following
    await asyncio.gather(busy, first)
    assert status == 200
    other = "b" if home == "a" else "a"
    assert (_decisions(gw, other)["moved_busy"] >= 1) is moved


def test_one_conversations_hashing_in_a_thread_never_holds_up_anothers(monkeypatch):
    """A big body's prompt blocks are hashed in a thread (request/forward.py). functools.cached_property on
    Python 3.11 holds one lock for all instances while computing, so the event loop asking for a
    small request's blocks waited for the big one's hashing: measured 0.07 ms alone, 13.9 ms then."""
    import threading
    import time

    from orchestrator import conversation as affinity

    hash_blocks = affinity.blocks
    started, release = threading.Event(), threading.Event()

    def slow_for_big(body):
        if body["messages"][0]["content"] == "big":
            started.set()
            release.wait(60)  # held until the small one is done (or a broken lock made it wait 60 s)
        return hash_blocks(body)

    monkeypatch.setattr(affinity, "blocks", slow_for_big)
    big = affinity.Conversation({"messages": [{"role": "user", "content": "big"}]})
    small = affinity.Conversation({"messages": [{"role": "user", "content": "small"}]})
    thread = threading.Thread(target=lambda: big.blocks)
    thread.start()
    try:
        assert started.wait(30)
        # An event, not a clock: the small one's blocks and key come while the big one's hashing is
        # still held, so they waited for none of it, however slow the machine.
        t0 = time.perf_counter()
        assert small.blocks and small.key
        assert not release.is_set() and time.perf_counter() - t0 < 30
    finally:
        release.set()
    thread.join()
    assert big.blocks == hash_blocks({"messages": [{"role": "user", "content": "big"}]})
