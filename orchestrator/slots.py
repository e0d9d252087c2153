"""`SlotQueue`: at most N requests in flight per backend, the rest wait in order.

Pure asyncio, no aiohttp: the invariants (never more than N in flight, every
slot released exactly once, priority order, bounded depth and wait) are tested
with plain tasks and randomised cancellations.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from enum import IntEnum
from typing import Callable, Iterable, Sequence

from .errors import Overloaded


class Priority(IntEnum):
    MAIN = 0
    BACKGROUND = 1


class QueueFull(Overloaded):
    reason = "queue_full"


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

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class SlotQueue:
    def __init__(self, name: str, slots: int, *, max_depth: int = 64, max_wait: float = 600.0,
                 retry_after: int = 10) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.name = name
        self.slots = slots
        self.max_depth = max_depth
        self.max_wait = max_wait
        self.retry_after = retry_after
        self._busy = 0
        self._open = True
        self._failure: Callable[[], Exception] | None = None
        self._waiters: list[list] = []  # heap of [priority, seq, future]
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
    def is_open(self) -> bool:
        return self._open

    def has_free_slot(self) -> bool:
        return self._open and self._busy < self.slots and not self._waiters

    async def acquire(self, priority: Priority = Priority.MAIN, *, front: bool = False) -> Lease:
        """Wait for a slot. `front` puts a request that already waited once (a
        retry after a backend failure) ahead of its class, past the depth bound."""
        if self._failure is not None:
            raise self._failure()
        if self.has_free_slot():
            return self._grant_now()
        if not front and len(self._waiters) >= self.max_depth:
            raise QueueFull(f"backend {self.name!r}: queue is full ({self.max_depth} waiting); retry later",
                            retry_after=self.retry_after)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seq = next(self._seq) - (1 << 62) if front else next(self._seq)
        entry = [int(priority), seq, fut]
        heapq.heappush(self._waiters, entry)
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

    def open(self) -> None:
        self._open = True
        self._failure = None
        self._wake()

    def fail(self, error: Callable[[], Exception]) -> None:
        """The backend will not come back by itself (FATAL, or down past the
        grace): answer every waiter, and every newcomer until `open()`, with `error()`."""
        self._open = False
        self._failure = error
        waiters, self._waiters = self._waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(error())

    def _grant_now(self) -> Lease:
        self._busy += 1
        self.acquired_total += 1
        return Lease(self)

    def _release(self) -> None:
        if self._busy <= 0:
            raise RuntimeError(f"slot queue {self.name!r}: release without acquire")
        self._busy -= 1
        self.released_total += 1
        self._wake()

    def _remove(self, entry: list) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._waiters)

    def _wake(self) -> None:
        while self._open and self._busy < self.slots and self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self._busy += 1
            self.acquired_total += 1
            fut.set_result(None)


def pick_queue(queues: Sequence[SlotQueue]) -> SlotQueue:
    """Within a group of backends for the same models: a free slot first, else the shortest queue."""
    if not queues:
        raise ValueError("no backend to pick from")
    for q in queues:
        if q.has_free_slot():
            return q
    open_queues: Iterable[SlotQueue] = [q for q in queues if q.is_open] or queues
    return min(open_queues, key=lambda q: (q.depth + q.busy) / q.slots)
