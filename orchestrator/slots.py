"""`SlotQueue`: at most N requests in flight per backend, the rest wait in order.

Pure asyncio, no aiohttp: the invariants (never more than N in flight, every
slot released exactly once, priority order, bounded depth, bytes and wait) are
tested with plain tasks and randomised cancellations.
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

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


# The defaults of config.QueueConfig (queue.max_depth, queue.max_bytes), for a queue built without it.
DEFAULT_MAX_DEPTH = 256
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class SlotQueue:
    def __init__(self, name: str, slots: int, *, max_depth: int = DEFAULT_MAX_DEPTH,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_wait: float = 600.0, retry_after: int = 10) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.name = name
        self.slots = slots
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.retry_after = retry_after
        self._busy = 0
        self._open = True
        self._failure: Callable[[], Exception] | None = None
        self._waiters: list[list] = []  # heap of [priority, seq, future, size]
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

    async def acquire(self, priority: Priority = Priority.MAIN, *, front: bool = False, size: int = 0) -> Lease:
        """Wait for a slot. `size`: the request's body in bytes, counted against `max_bytes` while it
        waits (a request alone in the queue is never refused for its size: the body limit bounds it).
        `front` puts a request that already waited once (a retry after a backend failure) ahead of its
        class, past both bounds."""
        if self._failure is not None:
            raise self._failure()
        if self.has_free_slot():
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
        entry = [int(priority), seq, fut, size]
        heapq.heappush(self._waiters, entry)
        self._waiting_bytes += size
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
        self._waiting_bytes = 0
        for _, _, fut, _ in waiters:
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
        self._waiting_bytes -= entry[3]
        heapq.heapify(self._waiters)

    def _wake(self) -> None:
        while self._open and self._busy < self.slots and self._waiters:
            _, _, fut, size = heapq.heappop(self._waiters)
            self._waiting_bytes -= size
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
