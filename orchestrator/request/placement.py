"""Where a request runs: which backend of its group serves it, and a granted slot there.

In a pool the conversation goes back to its own backend (backends/pool.py), else to
the least busy. A request waiting for a backend that goes down (or fails for
good) moves to another backend of its group that is up, and one waiting while
its backend is down moves when another comes back. While it waits, its
conversation is registered with the backend's KV saves, so a restore after a
restart brings back the first waiter's conversation. Once granted, and before
its send, the slot's conversation may be parked and the request's unparked
(`prepare`, parking.py). When an answer ended whole, the conversation's home and
its save follow, and why its prompt missed the cache is recorded (`served`). Each
step reads the request's Exchange and writes what it decided there (backend, lease,
slot turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..backends.gateway import Backend, Gateway
from ..conversation import Conversation
from ..errors import Overloaded
from ..kv.cachemiss import ServedTurn
from ..kv.parking import SlotFound
from ..slots import Lease, Priority, Tag, pick_queue
from .exchange import Exchange
from .parking import answered, before_send, keep_seconds

log = logging.getLogger(__name__)


def pooled(gw: Gateway, group: list[Backend]) -> bool:
    """Whether the request's group is a pool with conversation affinity."""
    return gw.pool is not None and len(group) > 1


async def place(gw: Gateway, group: list[Backend], ex: Exchange, *, retry: bool) -> None:
    """A granted slot (`ex.lease`) on the backend chosen for the request (`ex.backend`), its wait and
    refusals counted. `retry`: the request was sent before and failed, so it goes ahead of its class."""
    priority = ex.route.priority
    backend = pick(gw, group, ex.conversation)
    enqueued = time.monotonic()
    try:
        ex.backend, ex.lease = await _acquire(gw, group, ex, backend, retry)
    except Overloaded as e:
        gw.metrics.rejections.labels(e.reason).inc()
        raise
    except asyncio.CancelledError:
        gw.metrics.disconnects.labels("queued").inc()
        raise
    gw.metrics.queue_wait.labels(ex.backend.name, priority.name.lower()).observe(time.monotonic() - enqueued)


async def prepare(gw: Gateway, ex: Exchange) -> None:
    """In the granted slot, before the send: park the slot's conversation, unpark this one."""
    ex.turn = await before_send(gw, ex.backend, ex.conversation, ex.call)


def served(gw: Gateway, group: list[Backend], ex: Exchange) -> None:
    """A whole answer: its conversation lives on its backend now, and may be saved there. An answer
    that asks for a tool has the conversation's next turn coming as soon as the tool ran: its slot is
    kept for it a moment (slots.py) when a switch would cost."""
    backend, conversation, outcome, turn = ex.backend, ex.conversation, ex.outcome, ex.turn
    answered(backend, conversation, outcome, turn)
    seconds = keep_seconds(backend, outcome.prompt_tokens + outcome.output_tokens,
                           gw.config.queue.cache_preference_keep_seconds)
    if seconds > 0 and outcome.stop_reason == "tool_use":
        ex.call.keep_for = (conversation.key, seconds)
    if gw.misses is not None and outcome.prompt_tokens > 0:
        off = backend.kv.watch.off if backend.kv is not None else ""
        seen = gw.misses.observe(backend.name, conversation.key, conversation.blocks,
                                 ServedTurn(turn.how, outcome.prompt_tokens, outcome.cache_read_tokens, turn.seconds, off))
        outcome.cache_reason = seen["reason"] + (f" at {seen['at_block']}" if "at_block" in seen else "")
        if turn.how is SlotFound.UNPARKED and backend.kv is not None and seen["reason"] != "prefix_changed":
            restored_read(gw, backend, seen, turn.restored)
    if pooled(gw, group):
        gw.pool.served(conversation.key, backend.name, time.monotonic() - outcome.granted)
    if backend.kv is not None:
        gw.kv.finished(backend.kv, conversation, outcome.prompt_tokens + outcome.output_tokens)


def restored_read(gw: Gateway, backend: Backend, seen: dict, restored: int) -> None:
    """The first turn after a restore: one that read back under half of it is counted, and a few in a
    row turn the backend's restores off (kv/restorable.py)."""
    short = seen["reason"] == "restore_ineffective"
    if short:
        gw.metrics.kv_restores_short.labels(backend.name).inc()
    if backend.kv.watch.after_restore(short, restored or seen["prompt"], seen["cached"]):
        log.warning("backend %s: KV restores off: %s", backend.name, backend.kv.watch.off)


def pick(gw: Gateway, group: list[Backend], conversation: Conversation) -> Backend:
    """In a pool, the conversation's own backend (backends/pool.py); else the least busy."""
    by_queue = {id(b.queue): b for b in group}
    if not pooled(gw, group):
        return by_queue[id(pick_queue([b.queue for b in group]))]
    choice = gw.pool.choose([b.queue for b in group], conversation.key)
    gw.metrics.affinity.labels(choice.queue.name, choice.decision.value).inc()
    return by_queue[id(choice.queue)]


async def _acquire(gw: Gateway, group: list[Backend], ex: Exchange, backend: Backend,
                   front: bool) -> tuple[Backend, Lease]:
    """A slot of `backend`. In a pool, a request waiting for a backend that goes down moves to
    another backend of the pool that is up, instead of waiting for its own to come back."""
    priority, conversation, size = ex.route.priority, ex.conversation, ex.size
    while True:
        with gw.kv.waiting(backend.kv, conversation) if backend.kv is not None else contextlib.nullcontext():
            if not pooled(gw, group):
                return backend, await backend.queue.acquire(priority, front=front, size=size,
                                                            tag=_tag(conversation))
            lease = await _acquire_unless_down(group, backend, priority, front, size, _tag(conversation))
        if lease is not None:
            return backend, lease
        # Moved: it waited already, so it goes ahead of the newcomers of its class there.
        backend, front = pick(gw, group, conversation), True


def _tag(conversation: Conversation) -> Tag:
    """The queue's name for the conversation (slots.py): its key, computed only if asked for."""
    return lambda: conversation.key


async def _acquire_unless_down(group: list[Backend], backend: Backend, priority: Priority, front: bool,
                               size: int, tag: Tag) -> Lease | None:
    """`queue.acquire`, or None (move) once its backend is down or failed while another backend of
    the group is up: when it goes down, or when another one comes back while it is down."""
    me = asyncio.current_task()
    queue = backend.queue
    moved = False

    def elsewhere() -> bool:
        return not queue.is_open and any(b.queue.is_open for b in group if b is not backend)

    async def watch() -> None:
        nonlocal moved
        while True:
            # Every backend of the group: the one waited for going down, or another coming back.
            events = [b.health.changed for b in group]  # a new Event after every change
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if elsewhere():
                moved = True
                me.cancel()
                return

    if elsewhere():
        return None
    # The wait runs in this task (not a task of its own) so that it is in the queue before the
    # next request picks: its pick sees this one waiting.
    watcher = asyncio.create_task(watch(), name=f"move-watch:{queue.name}")
    try:
        return await queue.acquire(priority, front=front, size=size, tag=tag)
    except asyncio.CancelledError:
        # Ours alone (no other cancellation pending, e.g. the client leaving): move.
        if moved and me.uncancel() == 0:
            return None
        raise
    except Overloaded:
        # Its backend failed for good (FATAL, or down past the grace) and told its waiters so;
        # another backend of the group can still take the request.
        if elsewhere():
            return None
        raise
    finally:
        watcher.cancel()
