"""`SlotQueue`: at most N requests in flight per backend, the rest wait in order.

The order is priority, then arrival, with one exception made for the prompt
cache: among waiters of the best waiting priority, one of a conversation a slot
was last given (its `tag`) goes first, so a tool loop's next turn does not pay a
switch of the slot's cache (a park and an unpark, or a re-prefill). Bounded: the
waiter it passes keeps its place once it has been passed `prefer_max_passes`
times or has waited `prefer_max_seconds`, and a request sent again after a failure
(`front`) is never passed.

Pure asyncio, no aiohttp: the invariants (never more than N in flight, every
slot released exactly once, priority order, bounded depth, bytes and wait) are
tested with plain tasks and randomised cancellations.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable, Sequence

from .errors import Overloaded


class Priority(IntEnum):
    MAIN = 0
    BACKGROUND = 1


class QueueFull(Overloaded):
    reason = "queue_full"


class QueueBytesFull(QueueFull):
    """Past the bytes bound: the bodies of waiting requests, parsed, cost about 3x their size in memory."""

    reason = "queue_bytes"


class QueueTimeout(Overloaded):
    reason = "queue_timeout"


class Lease:
    """One granted slot. `release()` is safe to call on every path, any number of times."""

    __slots__ = ("_queue", "_released")

    def __init__(self, queue: "SlotQueue") -> None:
        self._queue = queue
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._release()

    def keep_for(self, tag: str, seconds: float) -> None:
        """Release; but while others wait, the slot is kept up to `seconds` for the next request of
        conversation `tag` (within the preference's bounds), and goes on to the waiters after that."""
        if not self._released:
            self._released = True
            self._queue._release(tag, seconds)

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


# The defaults of config.QueueConfig (queue.max_depth, queue.max_bytes), for a queue built without it.
DEFAULT_MAX_DEPTH = 256
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

@dataclass(frozen=True)
class Limits:
    """A queue's bounds (config.queue's): the waiters' depth, bytes and wait, the retry-after sent past
    them, and how far the cache preference may pass a waiter (0 passes: no preference)."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES
    max_wait: float = 600.0
    retry_after: int = 10
    prefer_max_passes: int = 0
    prefer_max_seconds: float = 0.0

    @classmethod
    def of(cls, queue) -> "Limits":
        """From config.queue (a QueueConfig)."""
        return cls(queue.max_depth, queue.max_bytes, queue.max_wait_seconds, queue.retry_after_seconds,
                   queue.cache_preference_max_passes, queue.cache_preference_max_seconds)


# A waiter: [priority, seq, future, size, tag, enqueued, passed]; the heap orders by (priority, seq),
# seq being unique. `tag` names its conversation (a callable, asked only when the order is in
# question: a conversation's key costs a serialisation of its prefix); `passed`: how often a
# waiter of the slot's conversation went before it.
PRIORITY, SEQ, FUTURE, SIZE, TAG, ENQUEUED, PASSED = range(7)
Tag = Callable[[], str]


class SlotQueue:
    def __init__(self, name: str, slots: int, limits: Limits = Limits(), *,
                 on_preferred: Callable[[], None] | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.name = name
        self.slots = slots
        self.max_depth = limits.max_depth
        self.max_bytes = limits.max_bytes
        self.max_wait = limits.max_wait
        self.retry_after = limits.retry_after
        self._busy = 0
        # Requests its engine runs or holds that are not this queue's (other clients of a shared engine),
        # as the engine last said (backends/health.py writes it); placement counts them, admission not.
        self.outside = 0
        self._open = True
        self._failure: Callable[[], Exception] | None = None
        self.prefer_max_passes = limits.prefer_max_passes
        self.prefer_max_seconds = limits.prefer_max_seconds
        self._on_preferred = on_preferred
        self._waiters: list[list] = []  # heap of waiters (PRIORITY, SEQ, ... above)
        # The conversations the slots were last given, newest last: what their caches hold.
        self._given: collections.deque[Tag] = collections.deque(maxlen=slots)
        # A released slot kept for its conversation's next request: (its tag, the timer ending it).
        self._kept: tuple[str, asyncio.TimerHandle] | None = None
        self._waiting_bytes = 0  # the sizes of the entries in _waiters
        self._seq = itertools.count()
        # Counted for the invariant tests and /health.
        self.acquired_total = 0
        self.released_total = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @property
    def waiting_bytes(self) -> int:
        """The request bodies waiting, in bytes."""
        return self._waiting_bytes

    @property
    def is_open(self) -> bool:
        return self._open

    def has_free_slot(self) -> bool:
        return self._open and self._busy < self.slots and not self._waiters

    async def acquire(self, priority: Priority = Priority.MAIN, *, front: bool = False, size: int = 0,
                      tag: Tag | None = None) -> Lease:
        """Wait for a slot. `size`: the request's body in bytes, counted against `max_bytes` while it
        waits (a request alone in the queue is never refused for its size: the body limit bounds it).
        `front` puts a request that already waited once (a retry after a backend failure) ahead of its
        class, past both bounds. `tag`: the request's conversation, for the cache preference."""
        if self._failure is not None:
            raise self._failure()
        if self._kept is not None and tag is not None and self._open and tag() == self._kept[0]:
            kept = self._kept[0]
            if self._may_pass(lambda t: t == kept):
                return self._take_kept(tag)
            self._unkeep()  # the head may no longer be passed (a retry, its bounds): it goes first
        if self.has_free_slot():
            self._given.append(tag or _untagged)
            return self._grant_now()
        if not front and len(self._waiters) >= self.max_depth:
            raise QueueFull(f"backend {self.name!r}: queue is full ({self.max_depth} waiting); retry later",
                            retry_after=self.retry_after)
        if not front and self._waiters and self._waiting_bytes + size > self.max_bytes:
            raise QueueBytesFull(f"backend {self.name!r}: queue is full ({self._waiting_bytes / 1e6:.0f} MB of "
                                 f"requests waiting, {size / 1e6:.1f} MB more would pass queue.max_bytes = "
                                 f"{self.max_bytes / 1e6:.0f} MB); retry later", retry_after=self.retry_after)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seq = next(self._seq) - (1 << 62) if front else next(self._seq)
        entry = [int(priority), seq, fut, size, tag, time.monotonic(), 0]
        heapq.heappush(self._waiters, entry)
        self._waiting_bytes += size
        if front:
            self._unkeep()  # a retry is never kept waiting for another conversation's next turn
        try:
            async with asyncio.timeout(self.max_wait):
                await fut
        except BaseException as exc:  # CancelledError (client gone) and TimeoutError alike
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted in the same tick we were cancelled: hand the slot on.
                self._release()
            else:
                fut.cancel()
                self._remove(entry)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(
                    f"backend {self.name!r}: waited {self.max_wait:g}s for a free slot; retry later",
                    retry_after=self.retry_after) from None
            raise
        return Lease(self)

    def try_acquire(self) -> Lease | None:
        """A slot now, or None: for the gateway's own work (a KV save), which must never make a
        request wait, so it takes only a slot nobody is waiting for."""
        return self._grant_now() if self._failure is None and self.has_free_slot() else None

    def hold(self) -> None:
        """Stop granting slots (backend down); waiters stay queued."""
        self._open = False
        self._unkeep()

    def open(self) -> None:
        self._open = True
        self._failure = None
        self._wake()

    def fail(self, error: Callable[[], Exception]) -> None:
        """The backend will not come back by itself (FATAL, or down past the
        grace): answer every waiter, and every newcomer until `open()`, with `error()`."""
        self._open = False
        self._failure = error
        self._unkeep()
        waiters, self._waiters = self._waiters, []
        self._waiting_bytes = 0
        for entry in waiters:
            fut = entry[FUTURE]
            if not fut.done():
                fut.set_exception(error())

    def _grant_now(self) -> Lease:
        self._busy += 1
        self.acquired_total += 1
        return Lease(self)

    def _release(self, keep_for: str | None = None, seconds: float = 0.0) -> None:
        if self._busy <= 0:
            raise RuntimeError(f"slot queue {self.name!r}: release without acquire")
        self.released_total += 1
        if (keep_for and seconds > 0 and self._kept is None and self._may_pass(lambda t: t == keep_for)
                and not any(e[TAG] is not None and e[TAG]() == keep_for for e in self._waiters)):
            # (A turn of that conversation already waiting takes the slot now, by the preference.)
            # Still counted busy: nobody else is granted it until its conversation comes or time is up.
            timer = asyncio.get_running_loop().call_later(seconds, self._unkeep)
            self._kept = (keep_for, timer)
            return
        self._busy -= 1
        self._wake()

    def _take_kept(self, tag: Tag) -> Lease:
        """The kept slot, to its conversation's next request: it passes every waiter of the head's class."""
        self._kept[1].cancel()
        self._kept = None
        self.acquired_total += 1
        head = self._waiters[0] if self._waiters else None
        for e in self._waiters:
            if head is not None and e[PRIORITY] == head[PRIORITY]:
                e[PASSED] += 1
        self._given.append(tag)
        if self._on_preferred is not None:
            self._on_preferred()
        return Lease(self)

    def _unkeep(self) -> None:
        """The kept slot goes to the waiters (time is up, or the backend went down)."""
        if self._kept is None:
            return
        self._kept[1].cancel()
        self._kept = None
        self._busy -= 1
        self._wake()

    def _may_pass(self, holds: Callable[[str], bool]) -> bool:
        """Whether a request of a conversation for which `holds` is true may go before the head waiter:
        someone waits, the head is of another conversation, was not sent again, and is within bounds."""
        if not (self._open and self._waiters) or self.prefer_max_passes <= 0:
            return False
        head = self._waiters[0]
        return not (head[SEQ] < 0 or head[PASSED] >= self.prefer_max_passes or head[TAG] is None
                    or time.monotonic() - head[ENQUEUED] >= self.prefer_max_seconds or holds(head[TAG]()))

    def resize(self, slots: int) -> None:
        """Run `slots` requests at once from now on: the engine's own batch size, read at its (re)start
        (vLLM's --max-num-seqs). A smaller size takes effect as requests end; none is cut short."""
        if slots < 1 or slots == self.slots:
            return
        self.slots = slots
        self._given = collections.deque(self._given, maxlen=slots)
        self._wake()

    def _remove(self, entry: list) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        self._waiting_bytes -= entry[SIZE]
        heapq.heapify(self._waiters)

    def _wake(self) -> None:
        while self._open and self._busy < self.slots and self._waiters:
            entry = self._preferred() or heapq.heappop(self._waiters)
            self._waiting_bytes -= entry[SIZE]
            if entry[FUTURE].done():
                continue
            self._busy += 1
            self.acquired_total += 1
            self._given.append(entry[TAG] or _untagged)
            entry[FUTURE].set_result(None)

    def _preferred(self) -> list | None:
        """The first waiter of a conversation a slot holds, taken out of the heap, when it may pass
        the head of its priority class; None: the head goes first."""
        if not self._given:
            return None
        held = {given() for given in self._given}
        held.discard("")
        if not self._may_pass(held.__contains__):
            return None
        head = self._waiters[0]
        same_class = sorted((e for e in self._waiters if e[PRIORITY] == head[PRIORITY]), key=lambda e: e[SEQ])
        pick = next((e for e in same_class if e[TAG] is not None and not e[FUTURE].done() and e[TAG]() in held),
                    None)
        if pick is None:
            return None
        for e in same_class:
            if e[SEQ] >= pick[SEQ]:
                break
            e[PASSED] += 1
        self._waiters.remove(pick)
        heapq.heapify(self._waiters)
        if self._on_preferred is not None:
            self._on_preferred()
        return pick


def _untagged() -> str:
    return ""


def pick_queue(queues: Sequence[SlotQueue]) -> SlotQueue:
    """Within a group of backends for the same models: a free slot first, else the shortest queue."""
    if not queues:
        raise ValueError("no backend to pick from")
    for q in queues:
        if q.has_free_slot():
            return q
    open_queues: Iterable[SlotQueue] = [q for q in queues if q.is_open] or queues
    return min(open_queues, key=lambda q: (q.depth + q.busy) / q.slots)
