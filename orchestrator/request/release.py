"""When a backend has let go of a request the gateway abandoned.

A client that disconnects ends its handler at once, but the backend goes on
with the request until it notices the closed connection: between two tokens,
after a prefill batch, or only after it has read a body the gateway sent just
before the client left. Freeing the slot at the disconnect would let the next
request overlap the old one on a single-slot server. So the slot is held until
the backend's engine (llama-server: its `/slots`) shows no more requests
processing than the gateway has let through besides this one.

`in_slot` wraps every send in a granted slot (main and background alike), so
that the rule holds on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum
from typing import Callable, Iterator

from ..backends.gateway import Backend, Gateway
from ..backends.inflight import Call
from ..engines.base import Engine
from ..errors import GatewayError, UpstreamUnavailable
from ..slots import Lease

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
# A request abandoned before the backend answered anything may not have been
# read by it yet: idle must hold this long before it counts.
QUIET_SECONDS = 0.5


class Released(str, Enum):
    IDLE = "idle"          # the engine shows the slot idle
    GONE = "gone"          # the backend does not answer: nothing runs there
    UNKNOWN = "unknown"    # the engine cannot tell (not llama-server, or --no-slots): free once the connection closed


async def wait_released(engine: Engine, *, others: Callable[[], int], answered: bool, late_after: float,
                        on_late: Callable[[float], None]) -> Released:
    """Poll the engine until at most `others()` requests are processing there.

    `answered`: the backend had sent its answer's first bytes, so it had the
    request in a slot. Past `late_after` seconds `on_late` is told once and
    the wait goes on: a backend still busy is busy, not free.
    """
    start = time.monotonic()
    quiet_since: float | None = None
    warned = False
    while True:
        try:
            processing = await engine.processing()
        except UpstreamUnavailable:
            return Released.GONE
        except GatewayError:
            pass  # slow (busy in a long batch) or garbled: ask again
        else:
            if processing is None:
                return Released.UNKNOWN
            now = time.monotonic()
            if processing <= others():
                if answered:
                    return Released.IDLE
                quiet_since = quiet_since or now
                if now - quiet_since >= QUIET_SECONDS:
                    return Released.IDLE
            else:
                quiet_since = None
        waited = time.monotonic() - start
        if not warned and waited > late_after:
            warned = True
            on_late(waited)
        await asyncio.sleep(POLL_SECONDS if waited < 5 else 1.0)


@contextlib.contextmanager
def in_slot(gw: Gateway, backend: Backend, lease: Lease) -> Iterator[Call]:
    """One send in a granted slot, counted among the backend's sends in the tracker of what runs
    (inflight.py) while it runs. After it the slot is free, or, if the backend may still be working
    on an abandoned request, held until it lets go, so no second generation overlaps it."""
    call = gw.inflight.start_send(backend.name)
    try:
        yield call
    finally:
        gw.inflight.end_send(backend.name, call)
        if call.admin is not None and not call.admin.done():
            after_admin(gw, backend, lease, call)
        elif call.abandoned:
            release_when_idle(gw, backend, lease, call)
        elif call.keep_for is not None:
            lease.keep_for(*call.keep_for)
        else:
            lease.release()


def after_admin(gw: Gateway, backend: Backend, lease: Lease, call: Call) -> None:
    """The client left while the gateway's own work held its slot (a park or unpark): llama-server
    goes on with a slot action once asked, so the slot stays held until that work has ended."""
    async def hold() -> None:
        try:
            await asyncio.wait([call.admin])
        finally:
            if call.abandoned:
                release_when_idle(gw, backend, lease, call)
            else:
                lease.release()

    task = asyncio.create_task(hold(), name=f"admin-hold:{backend.name}")
    backend.held.add(task)
    task.add_done_callback(backend.held.discard)


def release_when_idle(gw: Gateway, backend: Backend, lease: Lease, call: Call) -> None:
    """Hold the slot until the backend has let go of the abandoned request."""
    left = time.monotonic()
    timeout = gw.config.gateway.release_timeout_seconds
    was_late: list[bool] = []

    def late(waited: float) -> None:
        was_late.append(True)
        message = (f"still processing a request abandoned {waited:.0f}s ago "
                   f"(gateway.release_timeout_seconds = {timeout:g}); its slot stays busy until it lets go")
        log.warning("backend %s: %s", backend.name, message)
        # /health says `stuck`; a supervised background server is restarted (health.py).
        backend.health.mark_stuck(message)

    def others() -> int:
        # What the backend may legitimately be processing besides abandoned requests: the live
        # sends it has begun to answer. A live send it has not answered yet, if already
        # processing, only makes the wait longer; another abandoned one must not count.
        return sum(1 for c in gw.inflight.sends(backend.name) if c.answered)

    async def hold() -> None:
        try:
            released = await wait_released(backend.engine, others=others, answered=call.answered,
                                           late_after=timeout, on_late=late)
            gw.metrics.release_wait.labels(backend.name, released.value).observe(time.monotonic() - left)
        finally:
            lease.release()
            if was_late:
                backend.health.unstuck()

    task = asyncio.create_task(hold(), name=f"release:{backend.name}")
    backend.held.add(task)
    task.add_done_callback(backend.held.discard)
