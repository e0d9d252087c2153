"""The requests in the gateway now, and the last ones it finished: what the dashboard shows and cancels.

One `Entry` per `/v1/messages` request, made by the dashboard's middleware before the handler runs and
reachable from the request path through a context variable (`attach`), so the request path needs no
argument for it. An entry reads the request's live `Outcome` (backend, grant, first token, usage): its
state is derived, never copied. Both collections are bounded: in flight by `max_inflight` (a request
past it runs, untracked), recent by `max_recent`.

Cancel ends a request exactly as a vanished client does: its handler task is cancelled, so the request
path counts the disconnect and, if the backend may still be working, holds the slot until it lets go.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# What is shown of a client-supplied header: enough to tell sessions apart, never a big string.
HEADER_CHARS = 80
SESSION_HEADER = "X-Claude-Code-Session-Id"
AGENT_HEADER = "x-claude-code-agent-id"

_current: contextvars.ContextVar["Entry | None"] = contextvars.ContextVar("inflight_entry", default=None)


def _header(headers, name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    # Printable characters only; the page escapes again (textContent), this keeps the JSON small.
    return "".join(ch for ch in value[:HEADER_CHARS] if ch.isprintable())


@dataclass(eq=False)
class Entry:
    id: int
    task: asyncio.Task | None
    arrived: float                  # monotonic
    session: str | None = None
    agent: str | None = None
    route: str = "pending"
    priority: str = "main"
    outcome: Any = None             # proxy.Outcome, live; None until the request is forwarded
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
            "backend": getattr(o, "backend", None), "session": self.session, "agent": self.agent,
            "age": round(end - self.arrived, 2),
            "wait": round((granted if granted is not None else end) - self.arrived, 2),
            # Since the slot was granted (prefill) or since the first token (generating).
            "in_state": round(end - (first if first is not None else granted), 2) if granted is not None else None,
            "ttft": round(first - self.arrived, 2) if first is not None else None,
            "computed": getattr(o, "input_tokens", 0), "cached": getattr(o, "cache_read_tokens", 0),
            "output": out_tokens, "tps": tps, "status": self.status, "cancelled": self.cancelled,
            "cache": getattr(o, "cache_reason", None),
        }


@dataclass
class Registry:
    max_inflight: int = 1024
    max_recent: int = 100
    live: dict[int, Entry] = field(default_factory=dict)
    recent: deque = field(default_factory=deque)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.max_recent)

    def begin(self, headers, task: asyncio.Task | None) -> Entry | None:
        entry = Entry(next(self._ids), task, time.monotonic(),
                      session=_header(headers, SESSION_HEADER), agent=_header(headers, AGENT_HEADER))
        if len(self.live) >= self.max_inflight:
            return None
        self.live[entry.id] = entry
        _current.set(entry)
        return entry

    def end(self, entry: Entry, status: str) -> None:
        entry.ended = time.monotonic()
        entry.status = getattr(entry.outcome, "label", None) or status
        if entry.cancelled:
            entry.status = "cancelled"
        if entry.route == "pending":
            entry.route = "gateway"  # answered by the gateway itself (synthetic) or refused
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

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        now = time.monotonic()
        return {"inflight": [e.view(now) for e in self.live.values()],
                "recent": [e.view(now) for e in reversed(self.recent)]}


def attach(outcome: Any, route: str, priority: str) -> None:
    """Called on the request path once the request is routed: the entry follows its outcome from here."""
    entry = _current.get()
    if entry is not None:
        entry.outcome, entry.route, entry.priority = outcome, route, priority

