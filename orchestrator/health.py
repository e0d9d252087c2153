"""Each backend's state, from its /health and from what requests to it meet.

A backend that refuses a connection is marked down at once and its queue is
held: queued requests wait for it to come back instead of each failing on its
own. Polling reopens the queue as soon as /health answers 200 again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import Enum
from typing import Callable

from .config import BackendConfig
from .errors import GatewayError
from .slots import SlotQueue
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


class State(str, Enum):
    UNKNOWN = "unknown"    # not yet checked; requests are let through
    LOADING = "loading"    # answers 503 while it loads its model
    READY = "ready"
    DOWN = "down"          # refuses connections


class BackendHealth:
    def __init__(self, backend: BackendConfig, queue: SlotQueue, *,
                 on_change: Callable[[str, State], None] | None = None) -> None:
        self.backend = backend
        self.queue = queue
        self.state = State.UNKNOWN
        self.since = time.time()
        self.last_error = ""
        self.changed = asyncio.Event()
        self._on_change = on_change or (lambda name, state: None)

    @property
    def up(self) -> bool:
        return self.state in (State.READY, State.UNKNOWN)

    def set(self, state: State, error: str = "") -> None:
        if error:
            self.last_error = error
        if state is self.state:
            return
        log.info("backend %s: %s -> %s %s", self.backend.name, self.state.value, state.value, error)
        self.state = state
        self.since = time.time()
        if self.up:
            self.queue.open()
        else:
            self.queue.hold()
        self._on_change(self.backend.name, state)
        self.changed.set()
        self.changed = asyncio.Event()

    def mark_down(self, error: str) -> None:
        self.set(State.DOWN, error)

    async def check(self, upstream: UpstreamClient, timeout: float) -> State:
        try:
            status, _ = await upstream.get_json(self.backend, self.backend.health_path, timeout=timeout)
        except GatewayError as e:
            self.set(State.DOWN, e.message)
            return self.state
        # A remote API without /health answers 404: it answers, so it is up.
        self.set(State.LOADING if status == 503 else State.READY,
                 "loading model (HTTP 503)" if status == 503 else "")
        return self.state

    async def poll(self, upstream: UpstreamClient, interval: float) -> None:
        while True:
            state = await self.check(upstream, timeout=max(interval, 1.0))
            # Poll fast while down so a restarted server is used the moment it is ready.
            delay = interval if state is State.READY else min(interval, 0.25)
            try:
                async with asyncio.timeout(delay):
                    await self.changed.wait()
            except TimeoutError:
                pass

    def snapshot(self) -> dict:
        return {"name": self.backend.name, "url": self.backend.url, "role": self.backend.role,
                "state": self.state.value, "since": self.since, "last_error": self.last_error,
                "slots": self.queue.slots, "busy": self.queue.busy, "queued": self.queue.depth}
