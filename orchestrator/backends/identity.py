"""Who is asking: Claude Code's session and agent headers, a conversation key built on them, and a
bounded registry of the agent tree (which sessions and agents are queued or running where).

Claude Code (2.1) sends `X-Claude-Code-Session-Id` with every request, and its agents add
`x-claude-code-agent-id` and `x-claude-code-parent-agent-id`. They tell apart conversations whose
prefixes are alike (two agents given the same task, two sessions opened on the same first prompt),
which would otherwise share one KV save and one affinity home and evict each other.

The headers are client input. So:
- a value is used only if it is short and plain (`VALID`); anything else counts as absent;
- the key is the header identity *combined with* the prefix key (`affinity.conversation_key`), never
  the header alone: a forged session id names a conversation of its own prefix, so it can reach no
  other client's save (a save is restored only for a matching key, and its tokens are the prefix);
- every map here is bounded, least recently seen first out.
No metrics and no aiohttp here: the handler reads the identity and hands it to `proxy.forward`.
"""

from __future__ import annotations

import collections
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..conversation import Conversation

SESSION = "X-Claude-Code-Session-Id"
AGENT = "X-Claude-Code-Agent-Id"
PARENT = "X-Claude-Code-Parent-Agent-Id"

# Claude Code's ids are UUIDs or short tokens (`a1b2c3...`); 128 plain characters is ample.
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Kinds of requester, a metric label: a closed set, no ids.
KINDS = ("main", "agent", "anonymous")
STATES = ("queued", "running")


@dataclass(frozen=True)
class Identity:
    session: str | None = None
    agent: str | None = None
    parent: str | None = None

    @property
    def kind(self) -> str:
        if self.agent is not None:
            return "agent"
        return "main" if self.session is not None else "anonymous"

    def describe(self) -> str:
        """For the log: short ids (enough to follow one conversation), never a whole header."""
        if self.kind == "anonymous":
            return "-"
        parts = [f"session {short(self.session)}"]
        if self.agent is not None:
            parts.append(f"agent {short(self.agent)}")
            if self.parent is not None:
                parts.append(f"parent {short(self.parent)}")
        return " ".join(parts)


def short(value: str | None) -> str:
    return (value or "-")[:8]


def _valid(value: str | None) -> str | None:
    return value if value is not None and VALID.fullmatch(value) else None


def from_headers(headers: Mapping[str, str]) -> Identity:
    """The request's identity; a header that is missing, too long or not plain is absent. An agent
    id without a session id is dropped too: it names nothing the gateway can place in a tree."""
    session = _valid(headers.get(SESSION))
    if session is None:
        return Identity()
    agent = _valid(headers.get(AGENT))
    parent = _valid(headers.get(PARENT)) if agent is not None else None
    return Identity(session, agent, parent)


def conversation_key(body: dict[str, Any], strip_billing: bool, ident: Identity) -> str:
    """The key of a conversation for affinity and KV saves: the prefix key alone without headers
    (older Claude Code, other clients), else the prefix key bound to the session and agent."""
    return Conversation(body, strip_billing, ident.session, ident.agent).key


@dataclass
class Node:
    """One requester (a session's main conversation, or one of its agents) as the gateway saw it."""

    parent: str | None
    queued: int = 0
    running: int = 0
    requests: int = 0
    backend: str | None = None
    last_seen: float = field(default_factory=time.time)

    def snapshot(self, name: str, now: float) -> dict[str, Any]:
        return {"id": short(name), "parent": short(self.parent) if self.parent else None,
                "queued": self.queued, "running": self.running, "requests": self.requests,
                "backend": self.backend, "idle_seconds": round(now - self.last_seen, 1)}


class Track:
    """One request's place in the tree: queued until `granted`, then running on a backend."""

    def __init__(self, node: Node | None) -> None:
        self.node, self.state = node, "queued"

    def granted(self, backend: str) -> None:
        if self.node is None:
            return
        if self.state == "queued":
            self.node.queued -= 1
            self.node.running += 1
            self.state = "running"
        self.node.backend = backend  # a retry on another backend moves it


MAIN = ""  # the node key of a session's own conversation (an agent id is never empty)


class Tree:
    """Sessions -> requesters (main and agents), each with what it has queued and running. Bounded:
    at most `max_sessions` sessions of at most `max_agents` requesters, least recently seen first
    out (a node with requests in flight is kept while it is in flight: `Track` holds it)."""

    def __init__(self, max_sessions: int = 256, max_agents: int = 64) -> None:
        self.max_sessions, self.max_agents = max_sessions, max_agents
        self._sessions: collections.OrderedDict[str, collections.OrderedDict[str, Node]] = \
            collections.OrderedDict()
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def _node(self, ident: Identity) -> Node | None:
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
        self._bound(nodes)
        return node

    def _bound(self, nodes: collections.OrderedDict[str, Node]) -> None:
        while len(nodes) > self.max_agents:
            nodes.popitem(last=False)
            self.forgotten += 1
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
            self.forgotten += 1

    @contextmanager
    def track(self, ident: Identity) -> Iterator[Track]:
        """Around one request, from arrival to its last byte."""
        node = self._node(ident)
        t = Track(node)
        if node is not None:
            node.queued += 1
            node.requests += 1
        try:
            yield t
        finally:
            if node is not None:
                if t.state == "queued":
                    node.queued -= 1
                else:
                    node.running -= 1
                node.last_seen = time.time()

    def in_flight(self) -> dict[tuple[str, str], int]:
        """(kind, state) -> requests, for a gauge with bounded labels (anonymous ones not counted here)."""
        out = {(k, s): 0 for k in KINDS[:2] for s in STATES}
        for nodes in self._sessions.values():
            for name, node in nodes.items():
                kind = "main" if name == MAIN else "agent"
                out[(kind, "queued")] += node.queued
                out[(kind, "running")] += node.running
        return out

    def snapshot(self, limit: int = 20) -> dict[str, Any]:
        """The most recently seen sessions, each with its requesters, for /health and `make status`."""
        now = time.time()
        sessions = []
        for sid, nodes in reversed(self._sessions.items()):
            if len(sessions) >= limit:
                break
            sessions.append({"id": short(sid), "idle_seconds": round(now - max(n.last_seen for n in
                                                                           nodes.values()), 1) if nodes else None,
                             "main": nodes[MAIN].snapshot(sid, now) if MAIN in nodes else None,
                             "agents": [n.snapshot(a, now) for a, n in nodes.items() if a != MAIN]})
        return {"sessions_known": len(self._sessions), "max_sessions": self.max_sessions,
                "max_agents_per_session": self.max_agents, "forgotten": self.forgotten, "sessions": sessions}
