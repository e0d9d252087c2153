"""Conversation affinity: each conversation goes back to the backend whose prompt cache holds it.

In a pool of backends for the same model, "least busy" is the wrong rule for
Claude Code: turn 2 of a conversation landing on the other server pays a cold
prefill of its whole prefix (25k tokens: minutes on a big model), and two
conversations on two servers would swap caches on every turn. So a
conversation, known by a key of its prefix, returns to the backend that served
it last, unless that backend is down or its expected wait is longer than a
bound; then it moves to the least loaded one (and stays there). Pure: no
aiohttp, tested with plain queues.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence

from ..slots import SlotQueue


class Decision(str, Enum):
    """How a request's backend was chosen."""

    HIT = "hit"                  # back to the backend that served the conversation last
    NEW = "new"                  # a conversation not seen (or forgotten): the least loaded
    MOVED_DOWN = "moved_down"    # its backend is down: the least loaded, and the conversation moves
    MOVED_BUSY = "moved_busy"    # its backend's expected wait is past the bound: likewise
    MOVED_GONE = "moved_gone"    # its backend no longer serves this model


DECISIONS = tuple(d.value for d in Decision)


@dataclass(frozen=True)
class Choice:
    queue: SlotQueue
    decision: Decision


class AffinityMap:
    """Conversation key -> backend name, least recently used first out past `max_entries`."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._map: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: str) -> str | None:
        backend = self._map.get(key)
        if backend is not None:
            self._map.move_to_end(key)
        return backend

    def set(self, key: str, backend: str) -> None:
        self._map[key] = backend
        self._map.move_to_end(key)
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def per_backend(self) -> dict[str, int]:
        return dict(collections.Counter(self._map.values()))


class Pool:
    """The affinity map and what it needs to decide: how long a request holds each backend's slot."""

    # Weight of the newest hold time in the running mean: a few requests tell a backend's pace.
    SMOOTHING = 0.3

    def __init__(self, max_entries: int = 10_000, max_wait: float = 120.0) -> None:
        self.homes = AffinityMap(max_entries)
        self.max_wait = max_wait
        self._hold: dict[str, float] = {}

    def expected_wait(self, queue: SlotQueue) -> float:
        """Seconds a request sent now would wait for `queue`'s slot: its place in line over the
        slots, times the mean time a request holds one (0 until one was seen)."""
        if _free(queue):
            return 0.0
        # Every slot is taken: the requests in line (and the engine's other clients') each wait for one
        # to free, `slots` at a time (counted as if the ones running had just begun: a bound on the safe side).
        rounds = (queue.depth + queue.outside) // queue.slots + 1
        return rounds * self._mean_hold(queue.name)

    def _mean_hold(self, backend: str) -> float:
        """Its own mean hold time; for a backend not seen finishing yet, the pool's (0 if none is known),
        so a busy newcomer is never taken for an idle one."""
        if backend in self._hold:
            return self._hold[backend]
        return sum(self._hold.values()) / len(self._hold) if self._hold else 0.0

    def choose(self, queues: Sequence[SlotQueue], key: str | None) -> Choice:
        home = self.homes.get(key) if key is not None else None
        return choose(queues, home, self.homes.per_backend(), self.max_wait, self.expected_wait)

    def served(self, key: str | None, backend: str, held: float) -> None:
        """A request of conversation `key` was answered by `backend`, holding its slot `held` seconds."""
        if key is not None:
            self.homes.set(key, backend)
        old = self._hold.get(backend)
        self._hold[backend] = held if old is None else old + self.SMOOTHING * (held - old)

    def snapshot(self) -> dict[str, Any]:
        return {"conversations": len(self.homes), "max_conversations": self.homes.max_entries,
                "homes": self.homes.per_backend(), "max_wait_seconds": self.max_wait,
                "mean_hold_seconds": {k: round(v, 3) for k, v in self._hold.items()}}


def least_loaded(queues: Sequence[SlotQueue], homes: dict[str, int]) -> SlotQueue:
    """A free slot first; else the shortest line per slot (the engine's other clients' requests
    counted, where it says them). Ties go to the backend that is home to
    the fewest conversations, so one that just came back (home to none) gets new ones first."""
    usable = [q for q in queues if q.is_open] or list(queues)
    free = [q for q in usable if _free(q)]
    if free:
        return min(free, key=lambda q: ((q.busy + q.outside) / q.slots, homes.get(q.name, 0)))
    return min(usable, key=lambda q: ((q.depth + q.busy + q.outside) / q.slots, homes.get(q.name, 0)))


def _free(queue: SlotQueue) -> bool:
    """A slot free now, counting what its engine runs for others (SlotQueue.outside)."""
    return queue.has_free_slot() and queue.busy + queue.outside < queue.slots


def choose(queues: Sequence[SlotQueue], home: str | None, homes: dict[str, int], max_wait: float,
           expected_wait: Callable[[SlotQueue], float]) -> Choice:
    """The backend for one request of a conversation whose home (last backend) is `home`."""
    by_name = {q.name: q for q in queues}
    if home is None:
        return Choice(least_loaded(queues, homes), Decision.NEW)
    queue = by_name.get(home)
    if queue is None:
        return Choice(least_loaded(queues, homes), Decision.MOVED_GONE)
    if not queue.is_open:
        others = [q for q in queues if q.is_open]
        if others:
            return Choice(least_loaded(others, homes), Decision.MOVED_DOWN)
        return Choice(queue, Decision.HIT)  # every backend is down: wait for its own
    wait = expected_wait(queue)
    if wait <= max_wait:
        return Choice(queue, Decision.HIT)
    others = [q for q in queues if q is not queue and q.is_open]
    if others:
        other = least_loaded(others, homes)
        if expected_wait(other) < wait:
            return Choice(other, Decision.MOVED_BUSY)
    return Choice(queue, Decision.HIT)
