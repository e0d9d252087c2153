import asyncio
import json
import random

import pytest

from orchestrator.configfile import config_from_dict
from orchestrator.slots import (
    Limits,
    Priority,
    QueueBytesFull,
    QueueFull,
    QueueTimeout,
    SlotQueue,
    pick_queue,
)
from testkit.client import sample


async def test_grants_up_to_slots_then_queues():
    q = SlotQueue("b", 2)
    a = await q.acquire()
    b = await q.acquire()
    assert q.busy == 2
    waiter = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    assert q.depth == 1 and not waiter.done()
    a.release()
    c = await waiter
    assert q.busy == 2 and q.depth == 0
    b.release()
    c.release()
    assert q.busy == 0


async def test_main_before_background_and_fifo_within_class():
    q = SlotQueue("b", 1)
    held = await q.acquire()
    order = []

    async def want(tag, prio):
        lease = await q.acquire(prio)
        order.append(tag)
        await asyncio.sleep(0)
        lease.release()

    tasks = [asyncio.create_task(want("bg1", Priority.BACKGROUND)),
             asyncio.create_task(want("m1", Priority.MAIN)),
             asyncio.create_task(want("bg2", Priority.BACKGROUND)),
             asyncio.create_task(want("m2", Priority.MAIN))]
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["m1", "m2", "bg1", "bg2"]


async def test_front_goes_ahead_of_its_class_and_past_depth_bound():
    q = SlotQueue("b", 1, Limits(max_depth=1))
    held = await q.acquire()
    order = []

    async def want(tag, front=False):
        lease = await q.acquire(Priority.MAIN, front=front)
        order.append(tag)
        lease.release()

    t1 = asyncio.create_task(want("first"))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await q.acquire()
    t2 = asyncio.create_task(want("retry", front=True))
    await asyncio.sleep(0)
    assert q.depth == 2
    held.release()
    await asyncio.gather(t1, t2)
    assert order == ["retry", "first"]


async def test_queue_full_is_529_with_retry_after():
    q = SlotQueue("primary", 1, Limits(max_depth=0, retry_after=7))
    await q.acquire()
    with pytest.raises(QueueFull) as e:
        await q.acquire()
    assert e.value.status == 529 and e.value.headers["retry-after"] == "7"
    assert e.value.body()["error"]["type"] == "overloaded_error"
    assert "primary" in e.value.message


async def test_wait_bound_times_out_and_leaves_queue():
    q = SlotQueue("b", 1, Limits(max_wait=0.05))
    lease = await q.acquire()
    with pytest.raises(QueueTimeout):
        await q.acquire()
    assert q.depth == 0
    lease.release()
    assert q.busy == 0


async def test_cancelled_waiter_leaves_queue():
    q = SlotQueue("b", 1)
    lease = await q.acquire()
    t = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    assert q.depth == 1
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.depth == 0
    lease.release()
    assert q.busy == 0


async def test_grant_and_cancel_in_same_tick_hands_slot_on():
    q = SlotQueue("b", 1)
    lease = await q.acquire()
    t = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    lease.release()      # grants to t (future resolved)...
    t.cancel()           # ...but t is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.busy == 0 and q.acquired_total == q.released_total


async def test_release_is_idempotent_and_double_release_of_queue_is_an_error():
    q = SlotQueue("b", 1)
    lease = await q.acquire()
    lease.release()
    lease.release()
    assert q.busy == 0 and q.released_total == 1
    with pytest.raises(RuntimeError):
        q._release()


async def test_hold_keeps_waiters_until_open():
    q = SlotQueue("b", 1)
    q.hold()
    t = asyncio.create_task(q.acquire())
    await asyncio.sleep(0.01)
    assert not t.done() and q.depth == 1
    q.open()
    lease = await t
    lease.release()


def test_pick_queue_prefers_free_then_shortest():
    a, b = SlotQueue("a", 1), SlotQueue("b", 1)
    assert pick_queue([a, b]) is a
    a._busy = 1
    assert pick_queue([a, b]) is b
    b._busy = 1
    a._waiters.append([0, 0, None, 0])
    assert pick_queue([a, b]) is b
    b.hold()
    assert pick_queue([a, b]) is a


@pytest.mark.parametrize("seed", range(30))
async def test_randomised_interleavings_keep_every_invariant(seed):
    """Many tasks, random priorities, holds, durations, cancellations and timeouts:
    never more than `slots` in flight, every grant released exactly once, nothing stuck."""
    rng = random.Random(seed)
    slots = rng.randint(1, 3)
    q = SlotQueue("b", slots, Limits(max_depth=rng.randint(3, 40), max_bytes=rng.randint(1, 4000),
                                     max_wait=rng.uniform(0.01, 0.2), prefer_max_passes=rng.choice([0, 1, 3]),
                                     prefer_max_seconds=rng.choice([0.005, 10.0])))
    in_flight = 0
    peak = 0
    outcomes = {"done": 0, "full": 0, "timeout": 0, "cancelled": 0, "failed": 0}

    async def worker():
        nonlocal in_flight, peak
        prio = rng.choice(list(Priority))
        try:
            tag = rng.choice([None, "a", "b", "c"])
            lease = await q.acquire(prio, front=rng.random() < 0.1, size=rng.randint(0, 500),
                                    tag=None if tag is None else (lambda: tag))
        except QueueFull:
            outcomes["full"] += 1
            return
        except QueueTimeout:
            outcomes["timeout"] += 1
            return
        in_flight += 1
        peak = max(peak, in_flight)
        assert in_flight <= slots
        try:
            async with lease:
                await asyncio.sleep(rng.uniform(0, 0.01))
                if rng.random() < 0.2:
                    raise ValueError("upstream error")
                if rng.random() < 0.3:
                    lease.release()  # released early, then again by the context manager
                elif tag is not None and rng.random() < 0.3:
                    lease.keep_for(tag, rng.uniform(0, 0.01))  # kept for its next turn a moment
            outcomes["done"] += 1
        except ValueError:
            outcomes["failed"] += 1
        finally:
            in_flight -= 1

    async def chaos(tasks):
        for _ in range(20):
            await asyncio.sleep(rng.uniform(0, 0.01))
            assert q.waiting_bytes == sum(entry[3] for entry in q._waiters)
            if rng.random() < 0.3:
                q.hold()
                await asyncio.sleep(rng.uniform(0, 0.02))
                q.open()
            victim = rng.choice(tasks)
            victim.cancel()

    tasks = []
    for _ in range(rng.randint(20, 80)):
        tasks.append(asyncio.create_task(worker()))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    chaos_task = asyncio.create_task(chaos(tasks))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await chaos_task
    q.open()
    await asyncio.sleep(0.02)  # a slot kept for a next turn that never came is free again
    outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert q.busy == 0, outcomes
    assert q.depth == 0
    assert q.waiting_bytes == 0
    assert q.acquired_total == q.released_total
    assert peak <= slots
    assert sum(outcomes.values()) == len(tasks)
    # The queue still works afterwards.
    lease = await q.acquire()
    lease.release()


async def test_fail_answers_waiters_and_newcomers_until_open():
    from orchestrator.errors import Overloaded

    q = SlotQueue("b", 1)
    lease = await q.acquire()
    waiter = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    q.fail(lambda: Overloaded("backend 'b' is FATAL"))
    with pytest.raises(Overloaded, match="FATAL"):
        await waiter
    with pytest.raises(Overloaded, match="FATAL"):
        await q.acquire()
    assert q.depth == 0
    lease.release()  # the running request still releases normally
    assert q.busy == 0 and q.acquired_total == q.released_total
    q.open()
    (await q.acquire()).release()


async def test_bytes_bound_counts_the_bodies_of_waiting_requests():
    q = SlotQueue("primary", 1, Limits(max_bytes=100, retry_after=3))
    running = await q.acquire(size=1000)  # granted at once: a running request is not waiting
    first = asyncio.create_task(q.acquire(size=60))
    await asyncio.sleep(0)
    with pytest.raises(QueueBytesFull) as e:
        await q.acquire(size=50)
    assert e.value.status == 529 and e.value.headers["retry-after"] == "3" and e.value.reason == "queue_bytes"
    assert "queue.max_bytes" in e.value.message and "primary" in e.value.message
    second = asyncio.create_task(q.acquire(size=40))
    await asyncio.sleep(0)
    assert q.waiting_bytes == 100 and q.depth == 2
    first.cancel()
    await asyncio.sleep(0)
    assert q.waiting_bytes == 40
    third = asyncio.create_task(q.acquire(size=60))
    await asyncio.sleep(0)
    running.release()  # grants `second`: its bytes no longer wait
    lease = await second
    assert q.waiting_bytes == 60
    lease.release()
    (await third).release()
    assert q.waiting_bytes == 0 and q.busy == 0


async def test_a_request_alone_is_never_refused_for_its_size_and_a_retry_passes_the_bound():
    q = SlotQueue("b", 1, Limits(max_bytes=10))
    running = await q.acquire()
    alone = asyncio.create_task(q.acquire(size=1000))
    await asyncio.sleep(0)
    assert q.depth == 1
    retry = asyncio.create_task(q.acquire(size=1000, front=True))
    await asyncio.sleep(0)
    assert q.waiting_bytes == 2000
    running.release()
    (await retry).release()
    (await alone).release()
    assert q.waiting_bytes == 0


async def test_bytes_leave_with_a_timeout_and_a_failure():
    from orchestrator.errors import Overloaded

    q = SlotQueue("b", 1, Limits(max_wait=0.02))
    running = await q.acquire()
    with pytest.raises(QueueTimeout):
        await q.acquire(size=500)
    assert q.waiting_bytes == 0
    waiter = asyncio.create_task(q.acquire(size=500))
    await asyncio.sleep(0)
    q.fail(lambda: Overloaded("FATAL"))
    with pytest.raises(Overloaded):
        await waiter
    assert q.waiting_bytes == 0
    running.release()


async def test_default_bounds_admit_five_claude_code_sessions_starting_at_once():
    """Five sessions, each a main request and a /context burst: about 70 requests on one slot, Claude
    Code's real main body (56 KB) each, and as many of a long session's 7 MB: not one 529."""
    cfg = config_from_dict({}).queue
    q = SlotQueue("primary", 1, Limits(max_depth=cfg.max_depth, max_bytes=cfg.max_bytes))
    assert (q.max_depth, q.max_bytes) == (SlotQueue("x", 1).max_depth, SlotQueue("x", 1).max_bytes)
    running = await q.acquire()
    for size in (len(json.dumps(sample("main-2.1.332.json")["body"])), 7 * 1024 * 1024):
        waiters = [asyncio.create_task(q.acquire(size=size)) for _ in range(70)]
        await asyncio.sleep(0)
        assert q.depth == 70 and not any(w.done() for w in waiters)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    running.release()
