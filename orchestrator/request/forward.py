"""`forward`: one request (its Exchange) through a backend, sent again if it failed before any answer byte.

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

import aiohttp
from aiohttp import web

from .. import sse
from ..backends.gateway import Backend, Gateway
from ..backends import identity
from ..backends.health import State
from ..conversation import folds_system
from ..engines.upstream import read_whole, request_headers, response_headers
from ..errors import GatewayError, Overloaded, UpstreamError, UpstreamUnavailable, from_upstream
from ..jsonvalues import INLINE_BYTES, utf8_json
from . import placement
from .accounting import Ended, Outcome, record
from .client_stream import ClientGone, ClientStream
from .exchange import Exchange
from .relay import is_anthropic_error, relay_stream
from .release import in_slot
from .routing import Rewrites, forwarded_body

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


async def forward(gw: Gateway, ex: Exchange) -> web.StreamResponse:
    """Send through the backend placement chooses; account the outcome on every path."""
    route = ex.route
    ex.outcome = Outcome(route.backends[0], status=Ended.CLIENT_GONE)
    # The dashboard follows its outcome from here, and the agent tree its requester.
    gw.inflight.forwarded(ex.entry, ex.outcome, route.kind.value, route.priority.name.lower())
    g = gw.config.gateway
    if ex.body.get("stream") is True:
        ex.client = ClientStream(ex.request, g.ping_interval_seconds, g.write_timeout_seconds)
    client, outcome = ex.client, ex.outcome
    try:
        if client is not None:
            client.keep_alive()
        response = await _forward(gw, ex)
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
        record(gw, route.kind.value, outcome, ex.arrived)


async def _forward(gw: Gateway, ex: Exchange) -> web.StreamResponse:
    group = gw.group(ex.route.backends)
    strip = gw.config.routing.strip_billing_header
    conversation = ex.conversation = identity.conversation(ex.body, strip, ex.identity)
    if placement.pooled(gw, group) and ex.size > INLINE_BYTES:
        # A pool's pick needs the key at once: a big body's is computed off the event loop.
        await asyncio.to_thread(lambda: conversation.key)
    # Its prompt's block hashes (why the cache missed, a save's prefix) cost ~8 ms a MB (bench_overhead):
    # a big body's are hashed in a thread while it waits and is answered, off the event loop and its path.
    # (Not cancelled if the request fails: a thread cannot be stopped, and it ends on its own.)
    hashed = asyncio.ensure_future(asyncio.to_thread(lambda: conversation.blocks)) if ex.size > INLINE_BYTES else None
    last_error: UpstreamUnavailable | None = None
    for attempt in range(MAX_SENDS):
        # Placed again for a retry: the failed backend's queue is held now, so another backend
        # of the group takes the request (and its conversation moves there).
        try:
            await placement.place(gw, group, ex, retry=attempt > 0)
        except Overloaded as e:
            if last_error is not None:
                e.message += f" (last failure: {last_error.message})"
            raise
        backend = ex.backend
        ex.outcome.backend = backend.name
        gw.inflight.granted(ex.entry, backend.name)  # the agent tree shows it running there
        ex.outcome.reset(granted=time.monotonic())
        try:
            with in_slot(gw, backend, ex.lease) as call:
                ex.call = call
                await placement.prepare(gw, ex)
                rewrite = functools.partial(forwarded_body, ex.body, ex.raw, rewrites_for(backend, strip))
                # A rewrite that cannot splice re-serialises the body: a large one off the event loop.
                data = rewrite() if ex.size <= INLINE_BYTES else await asyncio.to_thread(rewrite)
                headers = request_headers(ex.request.headers, backend.config, gw.config.gateway.api_key)
                if backend.config.session_header:  # for a router in front of the engine (config.py)
                    headers[backend.config.session_header] = (conversation.key if ex.size <= INLINE_BYTES else
                                                              await asyncio.to_thread(lambda: conversation.key))
                response = await _send(gw, ex, data, headers)
                if call.complete and ex.outcome.status is not Ended.STREAM_ERROR:
                    if hashed is not None:
                        await hashed
                    placement.served(gw, group, ex)
                return response
        except _Retry as r:
            last_error = r.cause
            backend.health.mark_down(r.cause.message)
            log.warning("backend %s failed before answering (send %d of %d): %s; the request waits for it "
                        "(or another backend of its group) to come back, up to queue.down_grace_seconds = %gs%s",
                        backend.name, attempt + 1, MAX_SENDS, r.cause.message, gw.config.queue.down_grace_seconds,
                        ", its client kept alive with SSE pings" if ex.client is not None and ex.client.started
                        else "")
        except asyncio.CancelledError:
            # The client left (its handler is cancelled) while its request held the slot.
            gw.metrics.disconnects.labels("in_slot").inc()
            raise
    gw.metrics.rejections.labels("backend_down").inc()
    raise Overloaded(f"{last_error.message if last_error else 'backend failed'}; "
                     f"gave up after {MAX_SENDS} sends", retry_after=gw.config.queue.retry_after_seconds)


async def _send(gw: Gateway, ex: Exchange, data: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """One send of `data` to the exchange's backend: the streamed answer relayed, or the whole answer
    checked; _Retry while nothing of the answer was received."""
    backend, call = ex.backend, ex.call
    call.sent = True
    try:
        async with gw.upstream.post(backend.config, ex.request.path_qs, data, headers) as resp:
            if resp.status != 200:
                raw = await read_whole(resp, MAX_ERROR_BYTES, backend.config)
                call.complete = True
                if resp.status == 503:
                    # llama-server answers 503 while it loads its model: nothing ran.
                    backend.health.set(State.LOADING, "loading model (HTTP 503)")
                    raise UpstreamUnavailable(f"backend {backend.name!r} is loading its model")
                raise from_upstream(resp.status, raw, resp.headers.get("Retry-After"))
            ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if ex.client is not None:
                if ctype != "text/event-stream":
                    raise UpstreamError(f"backend {backend.name!r} answered a streaming request with "
                                        f"{ctype or 'no Content-Type'}, not text/event-stream")
                return await relay_stream(ex, resp)
            raw = await read_whole(resp, MAX_ANSWER_BYTES, backend.config)
            call.complete = True
    except UpstreamUnavailable as e:
        raise _Retry(e) from e
    return _whole_answer(ex, raw, resp, ctype)


def _whole_answer(ex: Exchange, raw: bytes, resp: aiohttp.ClientResponse, ctype: str) -> web.Response:
    """A non-streaming answer, if it is an Anthropic message, with the client's model name."""
    backend, model = ex.backend, ex.model
    message = ex.outcome.observe_message(raw)
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


def rewrites_for(backend: Backend, strip_billing: bool) -> Rewrites:
    """What a request sent to `backend` needs changed: its config's clamp and folds, and what its
    engine said it serves (the model name it answers to, the most max_tokens it takes)."""
    served = backend.health.served
    caps = [n for n in (backend.config.max_output_tokens, served.max_tokens) if n]
    return Rewrites(strip_billing=strip_billing, fold_system=folds_system(backend.config),
                    max_tokens=min(caps, default=0), model=served.model)
