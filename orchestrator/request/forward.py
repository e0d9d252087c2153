"""`forward`: one request through a backend, sent again if it failed before any answer byte.

The rules that keep a request from being lost, duplicated or corrupted live
here. A request whose backend failed before any of its answer reached the
client goes back to the head of the queue and is sent again once the backend
is healthy (or on another backend of its pool); once answer bytes have reached
the client, a failure ends the stream with an SSE `error` event instead, so it
is never silently truncated. Where it runs is placement's; how the stream is
relayed, relay's; how long its slot stays held, release's; what it cost,
accounting's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from .. import sse
from ..backends import inflight
from ..backends.gateway import Backend, Call, Gateway
from ..backends.health import State
from ..backends.identity import Identity, Track
from ..conversation import Conversation
from ..engines.upstream import read_whole, request_headers, response_headers
from ..errors import (
    GatewayError,
    Overloaded,
    UpstreamError,
    UpstreamUnavailable,
    from_upstream,
)
from ..jsonvalues import INLINE_BYTES, utf8_json
from . import placement
from .accounting import Ended, Outcome, record
from .client_stream import ClientGone, ClientStream
from .relay import is_anthropic_error, relay_stream
from .release import in_slot
from .routing import Route, forwarded_body

log = logging.getLogger(__name__)

# A request is sent at most this many times: once, plus a retry after each of
# two backend failures that happened before any answer byte reached the client.
# More would let one poison request crash-loop the server.
MAX_SENDS = 3
# Non-streaming answers are read whole before they are relayed.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# An error answer is read whole too, to be put in Anthropic's shape.
MAX_ERROR_BYTES = 256 * 1024


class _Retry(Exception):
    def __init__(self, cause: UpstreamUnavailable):
        self.cause = cause


async def forward(request: web.Request, gw: Gateway, body: dict[str, Any], raw: bytes, route: Route,
                  arrived: float, *, ident: Identity = Identity(), track: Track | None = None) -> web.StreamResponse:
    """Send through the backend placement chooses; account the outcome on every path. `ident`: who
    asks (Claude Code's session and agent), part of the conversation's key; `track`: its place in the
    agent tree, told when it runs."""
    outcome = Outcome(route.backends[0], status=Ended.CLIENT_GONE)
    inflight.attach(outcome, route.kind.value, route.priority.name.lower())  # the dashboard follows it
    g = gw.config.gateway
    client = (ClientStream(request, g.ping_interval_seconds, g.write_timeout_seconds)
              if body.get("stream") is True else None)
    try:
        if client is not None:
            client.keep_alive()
        response = await _forward(request, gw, body, raw, route, outcome, client, ident, track)
        if outcome.status is Ended.CLIENT_GONE:
            outcome.status = 200
        return response
    except ClientGone as gone:
        gw.metrics.disconnects.labels("in_slot").inc()
        outcome.status = Ended.CLIENT_GONE
        return gone.response or web.Response(status=499)
    except GatewayError as e:
        if client is None or not client.started:
            outcome.status = e.status
            raise
        # Headers and pings went out already: the error can only be an event.
        outcome.status = Ended.STREAM_ERROR
        try:
            await client.write(sse.encode("error", e.body()))
            return await client.finish()
        except ClientGone as gone:
            return gone.response
    finally:
        if client is not None:
            with contextlib.suppress(ClientGone):
                await client.stop_keep_alive()
        record(gw, route.kind.value, outcome, arrived)


async def _forward(request: web.Request, gw: Gateway, body: dict[str, Any], raw: bytes, route: Route,
                   outcome: Outcome, client: ClientStream | None, ident: Identity,
                   track: Track | None) -> web.StreamResponse:
    group = gw.group(route.backends)
    strip = gw.config.routing.strip_billing_header
    conversation = Conversation(body, strip, ident.session, ident.agent)
    if placement.pooled(gw, group) and len(raw) > INLINE_BYTES:
        # A pool's pick needs the key at once: a big body's is computed off the event loop.
        await asyncio.to_thread(lambda: conversation.key)
    # Its prompt's block hashes (why the cache missed, a save's prefix) cost ~8 ms a MB (bench_overhead):
    # a big body's are hashed in a thread while it waits and is answered, off the event loop and its path.
    # (Not cancelled if the request fails: a thread cannot be stopped, and it ends on its own.)
    hashed = asyncio.ensure_future(asyncio.to_thread(lambda: conversation.blocks)) if len(raw) > INLINE_BYTES else None
    last_error: UpstreamUnavailable | None = None
    for attempt in range(MAX_SENDS):
        # Placed again for a retry: the failed backend's queue is held now, so another backend
        # of the group takes the request (and its conversation moves there).
        try:
            backend, lease = await placement.place(gw, group, route.priority, conversation, len(raw),
                                                   retry=attempt > 0)
        except Overloaded as e:
            if last_error is not None:
                e.message += f" (last failure: {last_error.message})"
            raise
        outcome.backend = backend.name
        if track is not None:
            track.granted(backend.name)  # the agent tree shows it running there
        outcome.reset(granted=time.monotonic())
        try:
            with in_slot(gw, backend, lease) as call:
                turn = await placement.prepare(gw, backend, conversation, call)
                rewrite = functools.partial(forwarded_body, body, raw, strip_billing=strip,
                                            max_output_tokens=backend.config.max_output_tokens)
                # A rewrite that cannot splice re-serialises the body: a large one off the event loop.
                data = rewrite() if len(raw) <= INLINE_BYTES else await asyncio.to_thread(rewrite)
                headers = request_headers(request.headers, backend.config, gw.config.gateway.api_key)
                response = await _exchange(gw, backend, request.path_qs, data, headers, client, outcome,
                                           body.get("model"), call)
                if call.complete and outcome.status is not Ended.STREAM_ERROR:
                    if hashed is not None:
                        await hashed
                    placement.served(gw, group, backend, conversation, outcome, call, turn)
                return response
        except _Retry as r:
            last_error = r.cause
            backend.health.mark_down(r.cause.message)
            log.warning("backend %s failed before answering (send %d of %d): %s; the request waits for it "
                        "(or another backend of its group) to come back, up to queue.down_grace_seconds = %gs%s",
                        backend.name, attempt + 1, MAX_SENDS, r.cause.message, gw.config.queue.down_grace_seconds,
                        ", its client kept alive with SSE pings" if client is not None and client.started else "")
        except asyncio.CancelledError:
            # The client left (its handler is cancelled) while its request held the slot.
            gw.metrics.disconnects.labels("in_slot").inc()
            raise
    gw.metrics.rejections.labels("backend_down").inc()
    raise Overloaded(f"{last_error.message if last_error else 'backend failed'}; "
                     f"gave up after {MAX_SENDS} sends", retry_after=gw.config.queue.retry_after_seconds)


async def _exchange(gw: Gateway, backend: Backend, path: str, data: bytes, headers: dict[str, str],
                    client: ClientStream | None, outcome: Outcome, model: Any, call: Call) -> web.StreamResponse:
    """One send: the streamed answer relayed, or the whole answer checked; _Retry while nothing of
    the answer was received."""
    call.sent = True
    try:
        async with gw.upstream.post(backend.config, path, data, headers) as resp:
            if resp.status != 200:
                raw = await read_whole(resp, MAX_ERROR_BYTES, backend.config)
                call.complete = True
                if resp.status == 503:
                    # llama-server answers 503 while it loads its model: nothing ran.
                    backend.health.set(State.LOADING, "loading model (HTTP 503)")
                    raise UpstreamUnavailable(f"backend {backend.name!r} is loading its model")
                raise from_upstream(resp.status, raw, resp.headers.get("Retry-After"))
            ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if client is not None:
                if ctype != "text/event-stream":
                    raise UpstreamError(f"backend {backend.name!r} answered a streaming request with "
                                        f"{ctype or 'no Content-Type'}, not text/event-stream")
                return await relay_stream(client, backend, resp, outcome, model, call)
            raw = await read_whole(resp, MAX_ANSWER_BYTES, backend.config)
            call.complete = True
    except UpstreamUnavailable as e:
        raise _Retry(e) from e
    return _whole_answer(backend, raw, resp, ctype, outcome, model)


def _whole_answer(backend: Backend, raw: bytes, resp: aiohttp.ClientResponse, ctype: str, outcome: Outcome,
                  model: Any) -> web.Response:
    """A non-streaming answer, if it is an Anthropic message, with the client's model name."""
    message = outcome.observe_message(raw)
    if isinstance(message, dict) and is_anthropic_error(message):
        raise from_upstream(502, raw)
    if not isinstance(message, dict) or message.get("type") != "message":
        raise UpstreamError(f"backend {backend.name!r} answered 200 with {len(raw)} bytes that are not an "
                            f"Anthropic message ({ctype or 'no Content-Type'})")
    if isinstance(model, str) and message.get("model") != model:
        raw = utf8_json({**message, "model": model})
    headers = response_headers(resp.headers)
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    return web.Response(body=raw, status=200, headers=headers)
