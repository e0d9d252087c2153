"""The slot queue's cache preference: a waiter of the conversation a slot holds goes first, and a slot
is kept for its conversation's next turn, both within bounds (the queue itself: test_slots)."""

import asyncio

from orchestrator.slots import Limits, Priority, SlotQueue


# ---- the cache preference: the conversation a slot holds goes first, within bounds ----------------

def _tagged(name: str):
    return lambda: name


async def _grant_order(q: SlotQueue, holder: str, waiters: list[tuple[str, Priority]], *, front: str = "",
                       turns: int = 0, hold: float = 0.0) -> list[str]:
    """`holder` has the slot; `waiters` queue in order. On each grant the granted conversation's next
    turn arrives at once (a tool loop) while `turns` remain: the order in which slots were given."""
    lease = await q.acquire(tag=_tagged(holder))
    order: list[str] = []
    left = turns

    async def want(name: str, prio: Priority, is_front: bool = False):
        nonlocal left
        async with await q.acquire(prio, tag=_tagged(name), front=is_front):
            order.append(name)
            if name == holder and left > 0:
                left -= 1
                tasks.append(asyncio.create_task(want(name, prio)))
                await asyncio.sleep(0)
            await asyncio.sleep(hold)

    tasks = [asyncio.create_task(want(n, p, n == front)) for n, p in waiters]
    await asyncio.sleep(0)
    if hold:
        await asyncio.sleep(hold)
    lease.release()
    while not all(t.done() for t in tasks):
        await asyncio.gather(*tasks)
    return order


async def test_a_waiter_of_the_slots_conversation_goes_before_an_earlier_one_of_its_class():
    preferred = []
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60),
                  on_preferred=lambda: preferred.append(1))
    order = await _grant_order(q, "main", [("agent", Priority.MAIN), ("main", Priority.MAIN)])
    assert order == ["main", "agent"] and preferred == [1]


async def test_without_the_preference_the_order_is_arrival():
    q = SlotQueue("b", 1)
    assert await _grant_order(q, "main", [("agent", Priority.MAIN), ("main", Priority.MAIN)]) == ["agent", "main"]


async def test_the_preference_never_crosses_a_priority_class():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60))
    order = await _grant_order(q, "title", [("main", Priority.MAIN), ("title", Priority.BACKGROUND)])
    assert order == ["main", "title"]


async def test_a_retry_sent_to_the_front_is_never_passed():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60))
    order = await _grant_order(q, "main", [("agent", Priority.MAIN), ("main", Priority.MAIN)], front="agent")
    assert order == ["agent", "main"]


async def test_a_waiter_is_passed_at_most_max_passes_times():
    # The holder's tool loop keeps sending turns; the agent waits through 2 of them, not more.
    q = SlotQueue("b", 1, Limits(prefer_max_passes=2, prefer_max_seconds=60))
    order = await _grant_order(q, "main", [("agent", Priority.MAIN), ("main", Priority.MAIN)], turns=5)
    assert order[:4] == ["main", "main", "agent", "main"], order
    assert order.count("main") == 6


async def test_a_waiter_is_passed_only_while_it_has_waited_less_than_max_seconds():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=100, prefer_max_seconds=0.5))
    order = await _grant_order(q, "main", [("agent", Priority.MAIN), ("main", Priority.MAIN)], turns=50, hold=0.02)
    # Each grant holds at least 20 ms: the agent, waiting since the start, goes once it has waited
    # 0.5 s, so after at most 25 grants however fast the machine; passed at least once, as the first
    # grant comes 20 ms after it queued (25x within the bound, for a loaded machine).
    assert 1 <= order.index("agent") <= 26, order


async def _waiting(q: SlotQueue, name: str, order: list[str]) -> asyncio.Task:
    async def want():
        async with await q.acquire(tag=_tagged(name)):
            order.append(name)
    task = asyncio.create_task(want())
    await asyncio.sleep(0)
    return task


async def _kept_while_the_agent_waits() -> tuple[SlotQueue, list[str], asyncio.Task]:
    """Conversation main's slot, kept 10 s for its next turn while the agent waits."""
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60))
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    lease.keep_for("main", 10)
    return q, order, agent


async def test_a_slot_is_kept_for_its_conversations_next_turn_while_others_wait():
    preferred = []
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60),
                  on_preferred=lambda: preferred.append(1))
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    lease.keep_for("main", 10)  # far longer than the tool below takes on any machine
    assert q.busy == 1 and not agent.done()  # kept: the agent is not granted yet
    await asyncio.sleep(0.01)  # the tool ran; the next turn comes
    nxt = await q.acquire(tag=_tagged("main"))
    assert preferred == [1] and not agent.done()
    nxt.release()
    await agent
    assert order == ["agent"] and q.busy == 0 and q.acquired_total == q.released_total


async def test_a_kept_slot_goes_to_the_waiters_when_the_next_turn_does_not_come():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60))
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    started = asyncio.get_running_loop().time()
    lease.keep_for("main", 0.1)
    await agent
    assert 0.09 <= asyncio.get_running_loop().time() - started < 5  # not the 10 s of a keep, nor forever
    # Another conversation is not let in by the keep.
    assert order == ["agent"] and q.busy == 0


async def test_nobody_waiting_frees_the_slot_at_once_and_bounds_stop_the_keep():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=1, prefer_max_seconds=60))
    lease = await q.acquire(tag=_tagged("main"))
    lease.keep_for("main", 10)
    assert q.has_free_slot()  # nobody waited: nothing to keep it from
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    lease.keep_for("main", 10)
    lease = await q.acquire(tag=_tagged("main"))  # passes the agent once: the bound
    lease.keep_for("main", 10)
    await asyncio.wait_for(agent, 1)  # not kept again: the agent goes
    assert order == ["agent"]


async def test_a_retry_is_never_kept_waiting_for_another_conversations_next_turn():
    q, order, agent = await _kept_while_the_agent_waits()

    async def retry():
        async with await q.acquire(tag=_tagged("retried"), front=True):
            order.append("retried")
            await asyncio.sleep(0.05)

    retried = asyncio.create_task(retry())
    async with asyncio.timeout(5):  # the keep ended for it at once, not after 10 s
        while order != ["retried"]:
            await asyncio.sleep(0)
    # The kept conversation's next turn does not pass the agent now either: the keep is over.
    main = await _waiting(q, "main", order)
    await asyncio.wait_for(asyncio.gather(retried, agent, main), 1)
    assert order == ["retried", "main", "agent"] or order == ["retried", "agent", "main"]
    assert q.busy == 0 and q.acquired_total == q.released_total


async def test_a_kept_slot_is_not_taken_past_a_head_at_its_bound():
    """The keep was granted within the preference's bounds; by the time its turn comes the head may
    have reached them (here: passed once, the bound): the head goes first."""
    q = SlotQueue("b", 1, Limits(prefer_max_passes=1, prefer_max_seconds=60))
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    lease.keep_for("main", 10)
    q._waiters[0][6] = 1  # passed once since (by a preferred grant of the slot's conversation)
    second = asyncio.create_task(q.acquire(tag=_tagged("main")))
    await asyncio.wait_for(agent, 1)
    assert order == ["agent"]
    (await asyncio.wait_for(second, 1)).release()
    assert q.busy == 0


async def test_a_turn_of_the_kept_conversation_already_waiting_takes_the_slot_at_once():
    q = SlotQueue("b", 1, Limits(prefer_max_passes=3, prefer_max_seconds=60))
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    main = await _waiting(q, "main", order)
    lease.keep_for("main", 10)  # nothing to keep it for: main's turn is here
    await asyncio.wait_for(asyncio.gather(agent, main), 1)
    assert order == ["main", "agent"]


async def test_a_backend_going_down_ends_a_keep():
    q, order, agent = await _kept_while_the_agent_waits()
    q.hold()
    assert q.busy == 0
    q.open()
    await asyncio.wait_for(agent, 1)
    assert order == ["agent"]


async def test_without_the_preference_a_slot_is_never_kept():
    q = SlotQueue("b", 1)
    order: list[str] = []
    lease = await q.acquire(tag=_tagged("main"))
    agent = await _waiting(q, "agent", order)
    lease.keep_for("main", 10)
    await asyncio.wait_for(agent, 1)
