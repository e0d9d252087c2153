"""Who is asking: Claude Code's session and agent headers, parsed once per request (`from_headers`),
and a conversation key built on them. The agent tree they make is a view of what runs (inflight.py).

Claude Code (2.1) sends `X-Claude-Code-Session-Id` with every request, and its agents add
`x-claude-code-agent-id` and `x-claude-code-parent-agent-id`. They tell apart conversations whose
prefixes are alike (two agents given the same task, two sessions opened on the same first prompt),
which would otherwise share one KV save and one affinity home and evict each other.

The headers are client input. So:
- a value is used only if it is short and plain (`VALID`); anything else counts as absent;
- the key is the header identity *combined with* the prefix key (`conversation.conversation_key`), never
  the header alone: a forged session id names a conversation of its own prefix, so it can reach no
  other client's save (a save is restored only for a matching key, and its tokens are the prefix);
- the tree of sessions and agents built on them is bounded (inflight.Tree).
No metrics and no aiohttp here: the page's middleware reads the identity as the request arrives, and
the tracker's entry and the request's Exchange carry it from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..conversation import Conversation

SESSION = "X-Claude-Code-Session-Id"
AGENT = "X-Claude-Code-Agent-Id"
PARENT = "X-Claude-Code-Parent-Agent-Id"

# Claude Code's ids are UUIDs or short tokens (`a1b2c3...`); 128 plain characters is ample.
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What is shown of a header (the dashboard): enough to tell sessions apart, never a big string.
SHOWN_CHARS = 80
# Kinds of requester, a metric label: a closed set, no ids.
KINDS = ("main", "agent", "anonymous")
STATES = ("queued", "running")


@dataclass(frozen=True)
class Identity:
    session: str | None = None
    agent: str | None = None
    parent: str | None = None
    # What the session and agent headers said, cleaned for showing (the dashboard, escaped again
    # there): a forged value names no one, but an operator sees what was sent. Not part of who asks.
    shown_session: str | None = field(default=None, compare=False)
    shown_agent: str | None = field(default=None, compare=False)

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


def _shown(value: str | None) -> str | None:
    if value is None:
        return None
    # Printable characters only, and few: enough to tell sessions apart, never a big string.
    return "".join(ch for ch in value[:SHOWN_CHARS] if ch.isprintable())


def from_headers(headers: Mapping[str, str]) -> Identity:
    """The request's identity, read once as it arrives; a header that is missing, too long or not
    plain is absent. An agent id without a session id is dropped too: it names nothing the gateway
    can place in a tree."""
    said_session, said_agent = headers.get(SESSION), headers.get(AGENT)
    shown = {"shown_session": _shown(said_session), "shown_agent": _shown(said_agent)}
    session = _valid(said_session)
    if session is None:
        return Identity(**shown)
    agent = _valid(said_agent)
    parent = _valid(headers.get(PARENT)) if agent is not None else None
    return Identity(session, agent, parent, **shown)


def conversation(body: dict[str, Any], strip_billing: bool, ident: Identity) -> Conversation:
    """The conversation a request belongs to, for affinity and KV saves: its key is the prefix key
    alone without headers (older Claude Code, other clients), else the prefix key bound to the
    session and agent."""
    return Conversation(body, strip_billing, ident.session, ident.agent)
