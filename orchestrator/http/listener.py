"""The listening socket: a bound on connections, a deadline for request headers, and
aiohttp's own protocol refusals rendered as Anthropic errors.

aiohttp answers a malformed request (a header line too long, a bad
Content-Length, an unknown method) itself, in text/plain, before any handler
or middleware runs; and it waits for a request's headers as long as the client
likes to send them. Both are fixed here, at the protocol, so every byte a client
gets is in the same envelope and a slow client costs a timer, not a connection for ever.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..errors import GatewayError, error_for_status

log = logging.getLogger(__name__)


def raw_response(err: GatewayError) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for where no aiohttp response can be made."""
    body = err.body_bytes()
    phrase = HTTPStatus(err.status).phrase if err.status in HTTPStatus._value2member_map_ else "Error"
    head = [f"HTTP/1.1 {err.status} {phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in err.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# aiohttp's own line limits. They differ so that a refusal can say which was
# passed: the request line (414) or a header field (431).
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 16384


@dataclass
class Limits:
    max_connections: int = 512
    header_timeout: float = 30.0
    on_refusal: Callable[[str], None] = lambda reason: None


class GatewayProtocol(RequestHandler):
    """aiohttp's request handler with a header deadline and Anthropic-shaped protocol errors."""

    def __init__(self, manager: web.Server, *, guard: "ConnectionGuard", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._heads_seen = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.active += 1
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.active -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count > self._heads_seen:
            # A whole request head arrived: its handler owns the time from here.
            self._heads_seen = self._request_count
            self._disarm()
        elif self._head_timer is None and self._current_request is None and data:
            # The first bytes of the next request on a kept-alive connection.
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport is None or self._request_count > self._heads_seen or self._current_request is not None:
            return
        t = self._guard.limits.header_timeout
        self._guard.limits.on_refusal("timeout")
        self.transport.write(raw_response(error_for_status(
            408, f"request headers not received within {t:g}s (gateway.header_timeout_seconds)")))
        self.force_close()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer went out already; the connection is beyond repair.
            raise ConnectionError("response already started; cannot send an error")
        if status == 500:
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            text = "internal gateway error; see the gateway log"
        else:
            text = message or HTTPStatus(status).phrase
        error_type = None
        if isinstance(exc, LineTooLong):
            too_long = exc.args[1] if len(exc.args) > 1 else None
            status, text = ((431, f"a request header is over {MAX_FIELD_SIZE} bytes") if too_long == MAX_FIELD_SIZE
                            else (414, f"the request line is over {MAX_LINE_SIZE} bytes"))
        elif isinstance(exc, BadHttpMethod):
            status, text, error_type = 501, f"method not implemented: {text}", "invalid_request_error"
        self._guard.limits.on_refusal("bad_request")
        err = error_for_status(status, text)
        if error_type:
            err.error_type = error_type
        resp = web.Response(status=err.status, body=err.body_bytes(), content_type="application/json")
        resp.force_close()
        return resp


class _Refuse(asyncio.Protocol):
    """Past the connection limit: one 503 in the envelope, then close."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        err = error_for_status(503, f"too many connections (gateway.max_connections = {self.max_connections}); "
                                    f"retry later")
        err.headers["retry-after"] = "1"
        transport.write(raw_response(err))  # type: ignore[attr-defined]
        transport.close()


class ConnectionGuard:
    """The protocol factory: a GatewayProtocol per connection while under the limit."""

    def __init__(self, server: web.Server, limits: Limits, handler_kwargs: dict[str, Any]) -> None:
        self.server = server
        self.limits = limits
        self.handler_kwargs = handler_kwargs
        self.active = 0

    def __call__(self) -> asyncio.Protocol:
        if self.active >= self.limits.max_connections:
            self.limits.on_refusal("too_many_connections")
            return _Refuse(self.limits.max_connections)
        return GatewayProtocol(self.server, guard=self, loop=asyncio.get_running_loop(), **self.handler_kwargs)


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGuard."""

    __slots__ = ("_guard",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, guard: ConnectionGuard) -> None:
        # A backlog as deep as the connections allowed: with aiohttp's 128, a burst of a thousand
        # connects overflows the accept queue and the kernel resets some of them after their request
        # was sent (the client sees "server disconnected"), before the gateway could answer a 503.
        super().__init__(runner, host, port, reuse_address=True, backlog=max(128, guard.limits.max_connections))
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard, self._host, self._port,
                                                backlog=self._backlog, reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
