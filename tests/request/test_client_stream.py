"""The SSE response to one client: a client that stops reading counts as gone after the write
deadline, and its slot goes to the next request once the backend has let go."""

from __future__ import annotations

import asyncio
import json
import socket
import time


from orchestrator.backends.gateway import GATEWAY
from testkit.engine import FakeEngine

MAIN = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stream": True}
WRITE_TIMEOUT = 1.0


def _stalled_client(base: str) -> socket.socket:
    """A real client socket with a small receive buffer that sends a streaming request and then
    reads nothing (a Claude Code paused with Ctrl-Z)."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    body = json.dumps(MAIN).encode()
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body))
    return s


async def test_a_client_that_stops_reading_loses_its_slot_after_the_write_deadline(serve_app, gateway, http):
    # Megabytes of answer, more than any socket buffer holds, as fast as the gateway takes it.
    fake = FakeEngine(parts=200_000)
    url = await serve_app(fake.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}],
                               "gateway": {"write_timeout_seconds": WRITE_TIMEOUT}})
    gw = app[GATEWAY]
    stalled = _stalled_client(base)
    try:
        async with asyncio.timeout(30):
            while fake.generations_started == 0:
                await asyncio.sleep(0.01)
        t0 = time.monotonic()
        fake.parts = 3  # the next answer is short

        async def ask() -> int:
            async with http.post(base + "/v1/messages", json=dict(MAIN, stream=False)) as r:
                await r.read()
                return r.status

        # Without the deadline the stalled client would hold the slot forever: the bounds tell only
        # that from the 1 s deadline, with room for a loaded machine's slow polls of /slots.
        async with asyncio.timeout(WRITE_TIMEOUT + 60):
            status = await ask()
        waited = time.monotonic() - t0
        assert status == 200
        # Within the deadline plus the backend's letting go (its /slots polled), never two at once.
        print(f"second client served {waited:.2f} s after the stall began (write deadline {WRITE_TIMEOUT} s)")
        assert waited < WRITE_TIMEOUT + 30, waited
        assert fake.max_in_flight == 1 and not fake.crashed
        assert gw.metrics.registry.get_sample_value("orchestrator_client_disconnects_total",
                                                    {"stage": "in_slot"}) >= 1
    finally:
        stalled.close()
