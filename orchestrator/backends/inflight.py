"""What runs: the one tracker of the gateway's requests and of their sends, and the views read from it.

One `Entry` per `/v1/messages` request, begun by the page's middleware (http/page.py) before the
handler runs, with the request's identity (Claude Code's headers, parsed once: identity.py). The
request's Exchange carries the entry down the request path, which tells the tracker what happens to
it: `forwarded` (from then the entry reads the request's live `Outcome`: backend, grant, first token,
usage, so its state is derived, never copied; and its requester joins the agent tree), `granted` (it
runs on a backend), `end`. Each send in a granted slot is a `Call`, begun and ended by
release.in_slot. `InFlight` is the one writer of all of it; the rest reads views of it:

- `snapshot()`: the dashboard's queue, in-flight and recent lists, each bounded (the queue's first
  `max_listed` and its length; recent: `max_recent`), however many wait;
- `agents` (`Tree`): Claude Code's sessions and agents, bounded, least recently seen first out, each
  node's queued and running requests counted from the live entries (/health's "agents", the
  requesters-in-flight metrics);
- `sends(backend)`: the sends in progress on a backend whose clients are still there (/health's
  "sending", and what else release.py lets a backend be processing).

Cancel ends a request exactly as a vanished client does: its handler task is cancelled, so the request
path counts the disconnect and, if the backend may still be working, holds the slot until it lets go.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from .identity import KINDS, STATES, Identity, short

MAIN = ""  # the node key of a session's own conversation (an agent id is never empty)


@dataclass(eq=False)  # each send is its own: kept in sets by identity
class Call:
    """One send to a backend, as far as the backend's slot is concerned."""

    sent: bool = False       # the request went out: the backend may be working on it
    answered: bool = False   # the backend's answer began (it had the request in a slot)
    complete: bool = False   # its answer was read to the end: the backend is done with it
    # The gateway's own work on the slot before the send (a park, an unpark: parking.py); the slot
    # is not free before it ends, even if the client left during it.
    admin: asyncio.Task | None = None
    # Its answer ended whole: keep the slot this long for the conversation's next turn (slots.py).
    keep_for: tuple[str, float] | None = None

    @property
    def abandoned(self) -> bool:
        return self.sent and not self.complete


@dataclass
class Node:
    """One requester (a session's main conversation, or one of its agents) as the gateway saw it."""

    parent: str | None
    requests: int = 0
    backend: str | None = None
    last_seen: float = field(default_factory=time.time)
    live: int = 0  # its requests forwarded and not ended: a node with any is never forgotten

    def snapshot(self, name: str, now: float, counts: tuple[int, int]) -> dict[str, Any]:
        return {"id": short(name), "parent": short(self.parent) if self.parent else None,
                "queued": counts[0], "running": counts[1], "requests": self.requests,
                "backend": self.backend, "idle_seconds": round(now - self.last_seen, 1)}


@dataclass(eq=False)
class Entry:
    """One request as the tracker follows it."""

    id: int
    task: asyncio.Task | None
    arrived: float                  # monotonic
    identity: Identity = Identity()
    route: str = "pending"
    priority: str = "main"
    outcome: Any = None             # accounting.Outcome, live; None until the request is forwarded
    node: Node | None = None        # its requester in the agent tree, once forwarded with a session
    running_on: str | None = None   # the backend it was granted (a retry elsewhere moves it)
    status: str | None = None       # set when finished
    ended: float | None = None
    cancelled: bool = False

    @property
    def state(self) -> str:
        if self.ended is not None:
            return "done"
        o = self.outcome
        if o is None:
            return "parsing" if self.route == "pending" else "answering"
        if o.granted is None:
            return "queued"
        return "prefill" if o.first_content is None else "generating"

    def view(self, now: float) -> dict[str, Any]:
        o = self.outcome
        end = self.ended if self.ended is not None else now
        granted = getattr(o, "granted", None)
        first = getattr(o, "first_content", None)
        out_tokens = getattr(o, "output_tokens", 0)
        tps = None
        if first is not None and out_tokens > 1 and end > first:
            tps = round(out_tokens / (end - first), 1)
        return {
            "id": self.id, "state": self.state, "route": self.route, "priority": self.priority,
            "backend": getattr(o, "backend", None), "session": self.identity.shown_session,
            "agent": self.identity.shown_agent, "age": round(end - self.arrived, 2),
            "wait": round((granted if granted is not None else end) - self.arrived, 2),
            # Since the slot was granted (prefill) or since the first token (generating).
            "in_state": round(end - (first if first is not None else granted), 2) if granted is not None else None,
            "ttft": round(first - self.arrived, 2) if first is not None else None,
            "computed": getattr(o, "input_tokens", 0) + getattr(o, "cache_write_tokens", 0), "cached": getattr(o, "cache_read_tokens", 0),
            "output": out_tokens, "tps": tps, "status": self.status, "cancelled": self.cancelled,
            "cache": getattr(o, "cache_reason", None),
        }


class Tree:
    """Sessions -> requesters (main and agents), a view of the tracker: the requesters it has seen,
    bounded (at most `max_sessions` sessions of at most `max_agents` requesters, the least recently
    seen idle ones first out; one with a request in flight stays, past the bound if need be, which
    the tracker's live requests bound in turn), each with its queued and running requests counted from the tracker's live entries.
    Written by `InFlight` alone."""

    def __init__(self, live: dict[int, Entry], max_sessions: int = 256, max_agents: int = 64) -> None:
        self._live = live
        self.max_sessions, self.max_agents = max_sessions, max_agents
        self._sessions: collections.OrderedDict[str, collections.OrderedDict[str, Node]] = \
            collections.OrderedDict()
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def _joined(self, ident: Identity) -> Node | None:
        """The requester's node, most recently seen now, one more request of it live; None for a
        request without a session."""
        if ident.session is None:
            return None
        nodes = self._sessions.get(ident.session)
        if nodes is None:
            nodes = self._sessions[ident.session] = collections.OrderedDict()
        self._sessions.move_to_end(ident.session)
        name = ident.agent or MAIN
        node = nodes.get(name)
        if node is None:
            node = nodes[name] = Node(ident.parent)
        nodes.move_to_end(name)
        node.last_seen = time.time()
        node.requests += 1
        node.live += 1
        self._bound(nodes)
        return node

    def _bound(self, nodes: collections.OrderedDict[str, Node]) -> None:
        for name in _idle_first(nodes.items(), len(nodes) - self.max_agents, lambda n: n.live == 0):
            del nodes[name]
            self.forgotten += 1
        over = len(self._sessions) - self.max_sessions
        for sid in _idle_first(self._sessions.items(), over, lambda ns: all(n.live == 0 for n in ns.values())):
            del self._sessions[sid]
            self.forgotten += 1

    def _in_tree(self) -> Iterable[Entry]:
        return (e for e in self._live.values() if e.node is not None)

    def in_flight(self) -> dict[tuple[str, str], int]:
        """(kind, state) -> requests, for a gauge with bounded labels (anonymous ones not counted here)."""
        out = {(k, s): 0 for k in KINDS[:2] for s in STATES}
        for e in self._in_tree():
            out[("agent" if e.identity.agent else "main", "running" if e.running_on else "queued")] += 1
        return out

    def snapshot(self, limit: int = 20) -> dict[str, Any]:
        """The most recently seen sessions, each with its requesters, for /health and `make status`."""
        counts: dict[int, list[int]] = {}
        for e in self._in_tree():
            counts.setdefault(id(e.node), [0, 0])[e.running_on is not None] += 1
        now = time.time()

        def view(name: str, node: Node) -> dict[str, Any]:
            queued, running = counts.get(id(node), (0, 0))
            return node.snapshot(name, now, (queued, running))

        sessions = []
        for sid, nodes in reversed(self._sessions.items()):
            if len(sessions) >= limit:
                break
            sessions.append({"id": short(sid), "idle_seconds": round(now - max(n.last_seen for n in
                                                                           nodes.values()), 1) if nodes else None,
                             "main": view(sid, nodes[MAIN]) if MAIN in nodes else None,
                             "agents": [view(a, n) for a, n in nodes.items() if a != MAIN]})
        return {"sessions_known": len(self._sessions), "max_sessions": self.max_sessions,
                "max_agents_per_session": self.max_agents, "forgotten": self.forgotten, "sessions": sessions}


def _idle_first(items: Iterable[tuple[str, Any]], over: int, idle) -> list[str]:
    """Up to `over` keys, least recently seen first, of the items `idle` says may go."""
    out: list[str] = []
    if over > 0:
        for key, value in items:
            if idle(value):
                out.append(key)
                if len(out) == over:
                    break
    return out


class InFlight:
    """The one tracker of what runs (see the module's doc); its views are read, never written, outside."""

    def __init__(self, max_listed: int = 50, max_recent: int = 100, *,
                 max_sessions: int = 256, max_agents: int = 64) -> None:
        self.max_listed = max_listed
        self.live: dict[int, Entry] = {}
        self.recent: deque[Entry] = deque(maxlen=max_recent)
        self.agents = Tree(self.live, max_sessions, max_agents)
        self._sends: dict[str, set[Call]] = collections.defaultdict(set)
        self._ids = itertools.count(1)

    # ---- one request ----
    def begin(self, ident: Identity, task: asyncio.Task | None) -> Entry:
        entry = Entry(next(self._ids), task, time.monotonic(), ident)
        self.live[entry.id] = entry
        return entry

    def forwarded(self, entry: Entry, outcome: Any, route: str, priority: str) -> None:
        """Routed to a backend: the entry follows its outcome from here, and its requester is in the tree."""
        entry.outcome, entry.route, entry.priority = outcome, route, priority
        entry.node = self.agents._joined(entry.identity)

    def granted(self, entry: Entry, backend: str) -> None:
        entry.running_on = backend
        if entry.node is not None:
            entry.node.backend = backend

    def end(self, entry: Entry, status: str) -> None:
        entry.ended = time.monotonic()
        entry.status = getattr(entry.outcome, "label", None) or status
        if entry.cancelled:
            entry.status = "cancelled"
        if entry.route == "pending":
            entry.route = "gateway"  # answered by the gateway itself (synthetic) or refused
        if entry.node is not None and entry.id in self.live:
            entry.node.last_seen = time.time()
            entry.node.live -= 1
        entry.task = None
        self.live.pop(entry.id, None)
        self.recent.append(entry)

    def cancel(self, entry_id: int) -> bool:
        """Cancel a request still in flight; False when there is none by that id (finished, unknown)."""
        entry = self.live.get(entry_id)
        if entry is None or entry.task is None or entry.task.done() or entry.cancelled:
            return False
        entry.cancelled = True
        entry.task.cancel()
        return True

    # ---- one send ----
    def start_send(self, backend: str) -> Call:
        call = Call()
        self._sends[backend].add(call)
        return call

    def end_send(self, backend: str, call: Call) -> None:
        self._sends[backend].discard(call)

    # ---- views ----
    def sends(self, backend: str) -> frozenset[Call]:
        return frozenset(self._sends.get(backend, ()))

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's lists, each bounded by `max_listed` whatever the queue holds: the queue (main
        work first, then the longest waiting) and its length, the rest in flight, the recent ones."""
        now, limit = time.monotonic(), self.max_listed
        queued: list[Entry] = []
        others: list[Entry] = []
        for e in self.live.values():
            (queued if e.state == "queued" else others).append(e)
        others.sort(key=lambda e: e.state not in ("prefill", "generating"))  # what runs first: it can be cancelled
        first = heapq.nsmallest(limit, queued, key=lambda e: (e.priority != "main", e.arrived))
        return {"queue": [e.view(now) for e in first], "queued": len(queued),
                "inflight": [e.view(now) for e in itertools.islice(others, limit)],
                "recent": [e.view(now) for e in reversed(self.recent)]}
