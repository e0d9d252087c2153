"""The SSE response to one streaming client, prepared lazily, with keep-alive pings.

A streaming request may wait minutes before its first byte: behind other
requests in the queue, for a backend that restarts, or for a prefill of 25k
tokens on a big model. Clients give up on a silent connection (Node's fetch
waits at most 300 s for response headers), so after `interval` seconds of
silence the response headers go out and an SSE `ping` follows every
`interval`, until the backend's own bytes take over. A failure after that
point can only be told as an SSE `error` event.

A client that stops reading (a Claude Code paused with Ctrl-Z, a stuck
proxy) would block a write forever once the socket buffers are full, and its
request would hold the backend's slot forever. So each write has a deadline:
past it the connection is dropped and the client counts as gone, like one
that disconnected (its slot is freed once the backend lets go of it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Mapping

from aiohttp import web

from .. import sse
from ..engines.upstream import response_headers

PING = sse.encode("ping", {"type": "ping"})


class ClientGone(Exception):
    """The client disconnected while its answer streamed."""

    def __init__(self, response: web.StreamResponse | None):
        super().__init__("client disconnected")
        self.response = response


def stream_headers(upstream_headers: Mapping[str, str] | None = None) -> dict[str, str]:
    out = response_headers(upstream_headers or {})
    out.setdefault("Content-Type", "text/event-stream")
    out["Cache-Control"] = "no-cache"
    out["X-Accel-Buffering"] = "no"
    return out


class ClientStream:
    def __init__(self, request: web.Request, ping_interval: float, write_timeout: float | None = None) -> None:
        self.request = request
        self.interval = ping_interval
        self.write_timeout = write_timeout
        self.response: web.StreamResponse | None = None
        self._pinger: asyncio.Task | None = None
        # One write at a time, each whole: headers and a ping, or the backend's bytes.
        self._lock = asyncio.Lock()
        self._ping_write: asyncio.Future | None = None

    @property
    def started(self) -> bool:
        """Headers sent: from here on, errors are SSE events, not HTTP statuses."""
        return self.response is not None

    def keep_alive(self) -> None:
        if self.interval > 0 and self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_loop(), name="sse-ping")

    async def stop_keep_alive(self) -> None:
        pinger, self._pinger = self._pinger, None
        if pinger is None:
            return
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        # A ping under way when pings stop is finished, not cut: cut in the middle of preparing the
        # response, its headers could go out while `response` stays unset, and the next write would
        # prepare a second response into the same stream.
        write, self._ping_write = self._ping_write, None
        if write is not None:
            await asyncio.wait([write])
            if not write.cancelled() and write.exception() is not None:
                raise ClientGone(self.response) from write.exception()
        if not pinger.cancelled() and pinger.exception() is not None:
            raise ClientGone(self.response) from pinger.exception()

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # Only the sleep may be cancelled; the write runs to its end (stop_keep_alive waits for it).
            self._ping_write = asyncio.ensure_future(self._write(PING))
            await asyncio.shield(self._ping_write)

    async def write(self, chunk: bytes, upstream_headers: Mapping[str, str] | None = None) -> None:
        """The backend's bytes: pings stop for good before the first of them."""
        await self.stop_keep_alive()
        await self._write(chunk, upstream_headers)

    async def _write(self, chunk: bytes, upstream_headers: Mapping[str, str] | None = None) -> None:
        async with self._lock:
            try:
                async with asyncio.timeout(self.write_timeout):
                    if self.response is None:
                        response = web.StreamResponse(status=200, headers=stream_headers(upstream_headers))
                        await response.prepare(self.request)
                        self.response = response
                    await self.response.write(chunk)
            except TimeoutError as exc:
                # Not reading: dropped, so nothing else (the end of the response) waits on it either.
                if self.request.transport is not None:
                    self.request.transport.abort()
                raise ClientGone(self.response) from exc
            except (ConnectionError, RuntimeError) as exc:
                # Leaving the handler closes the upstream connection, which makes
                # llama-server stop generating and free the slot.
                raise ClientGone(self.response) from exc

    async def finish(self) -> web.StreamResponse:
        await self.stop_keep_alive()
        assert self.response is not None
        try:
            async with asyncio.timeout(self.write_timeout):
                await self.response.write_eof()
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
        except (ConnectionError, RuntimeError):
            pass
        return self.response
