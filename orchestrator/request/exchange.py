"""`Exchange`: one request and what happens to it, the one thing its way down passes along.

The handler (http/handlers.messages) makes it once the body is read and routed, from the tracker's
entry the page's middleware began (inflight.py: the request's identity, parsed once from Claude
Code's headers, and its arrival). forward, placement, release, relay and accounting read what the
request is from it (its body, raw and parsed, its route, its conversation) and write what happens to
it (its client stream, its outcome, the send under way: backend, slot, slot turn). Its parts keep
their own behaviour (Outcome reads the answer's usage, ClientStream pings, SlotTurn adds up the
parking); the Exchange only holds them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..backends.gateway import Backend
from ..backends.identity import Identity
from ..backends.inflight import Call, Entry
from ..conversation import Conversation
from ..slots import Lease
from .accounting import Outcome
from .client_stream import ClientStream
from .parking import SlotTurn
from .routing import Route


@dataclass(eq=False)
class Exchange:
    """One `/v1/messages` request, from its arrival to its accounting."""

    request: web.Request
    entry: Entry               # its line in the tracker of what runs
    raw: bytes                 # the body as sent: what a splice forwards
    body: dict[str, Any]
    route: Route
    # Set by forward: the conversation (its key places it, its blocks say why the cache missed), the
    # client's stream when it asked for one, and what the answer said of itself.
    conversation: Conversation | None = None
    client: ClientStream | None = None
    outcome: Outcome | None = None
    # The send under way (a retry is placed again and replaces them): set by placement and release.
    backend: Backend | None = None
    lease: Lease | None = None
    call: Call | None = None
    turn: SlotTurn = field(default_factory=SlotTurn)
    # Read once, here, from the entry and the body (plain fields: the way down reads them often).
    identity: Identity = field(init=False)  # who asks (Claude Code's session and agent): part of the key
    arrived: float = field(init=False)
    model: Any = field(init=False)          # the model name the client gave, set back in the answer
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.identity, self.arrived = self.entry.identity, self.entry.arrived
        self.model, self.size = self.body.get("model"), len(self.raw)
