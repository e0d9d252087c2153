"""One request through a backend: queue, send, relay, and account.

The rules that keep a request from being lost, duplicated or corrupted live
here. A request whose backend failed before any of its answer reached the
client goes back to the head of the queue and is sent again once the backend
is healthy; once answer bytes have reached the client, a failure ends the
stream with an SSE `error` event instead, so it is never silently truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import sse
from .client_stream import ClientGone, ClientStream
from .config import BackendConfig, Config
from .counting import TokenCounter
from .errors import (
    GatewayError,
    Overloaded,
    UpstreamError,
    UpstreamUnavailable,
    from_upstream,
)
from .health import BackendHealth, State
from .metrics import Metrics
from .routing import Route, forwarded_body
from .slots import SlotQueue, pick_queue
from .upstream import UpstreamClient, request_headers, response_headers

log = logging.getLogger(__name__)

# A request is sent at most this many times: once, plus a retry after each of
# two backend failures that happened before any answer byte reached the client.
# More would let one poison request crash-loop the server.
MAX_SENDS = 3
# Non-streaming answers are read whole before they are relayed.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


@dataclass
class Gateway:
    """Everything a handler needs; owned by the app, built once per process."""

    config: Config
    metrics: Metrics
    upstream: UpstreamClient
    counter: TokenCounter
    queues: dict[str, SlotQueue] = field(default_factory=dict)
    health: dict[str, BackendHealth] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


@dataclass
class Outcome:
    """What the relay learnt, for metrics and for the request log line."""

    backend: str
    status: str = "200"
    first_content: float | None = None
    granted: float | None = None
    input_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0

    def reset(self, granted: float) -> None:
        """A new send: forget what a failed one saw."""
        self.granted, self.first_content = granted, None
        self.input_tokens = self.cache_read_tokens = self.output_tokens = 0


class _Retry(Exception):
    def __init__(self, cause: UpstreamUnavailable):
        self.cause = cause


async def forward(request: web.Request, gw: Gateway, body: dict[str, Any], raw: bytes, route: Route,
                  arrived: float) -> web.StreamResponse:
    """Send through the least busy backend of the route's group; account the outcome on every path."""
    outcome = Outcome(route.backends[0], status="client_gone")
    client = ClientStream(request, gw.config.gateway.ping_interval_seconds) if body.get("stream") is True else None
    try:
        if client is not None:
            client.keep_alive()
        response = await _forward(request, gw, body, raw, route, outcome, client)
        if outcome.status == "client_gone":
            outcome.status = "200"
        return response
    except ClientGone as gone:
        gw.metrics.disconnects.labels("streaming").inc()
        outcome.status = "client_gone"
        return gone.response or web.Response(status=499)
    except GatewayError as e:
        if client is None or not client.started:
            outcome.status = str(e.status)
            raise
        # Headers and pings went out already: the error can only be an event.
        outcome.status = "stream_error"
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
                   outcome: Outcome, client: ClientStream | None) -> web.StreamResponse:
    group = [gw.queues[name] for name in route.backends]
    priority = route.priority.name.lower()
    last_error: UpstreamUnavailable | None = None
    for attempt in range(MAX_SENDS):
        # Picked again for a retry: the failed backend's queue is held now, so
        # another backend of the group with a free slot takes the request.
        queue = pick_queue(group)
        backend = gw.config.backend(queue.name)
        health = gw.health[backend.name]
        outcome.backend = backend.name
        enqueued = time.monotonic()
        try:
            lease = await queue.acquire(route.priority, front=attempt > 0)
        except Overloaded as e:
            gw.metrics.rejections.labels(getattr(e, "reason", "queue_full")).inc()
            if last_error is not None:
                e.message += f" (last failure: {last_error.message})"
            raise
        except asyncio.CancelledError:
            gw.metrics.disconnects.labels("queued").inc()
            raise
        outcome.reset(granted=time.monotonic())
        gw.metrics.queue_wait.labels(backend.name, priority).observe(outcome.granted - enqueued)
        data = forwarded_body(body, raw, strip_billing=gw.config.routing.strip_billing_header,
                              max_output_tokens=backend.max_output_tokens)
        try:
            async with lease:
                return await _exchange(gw.upstream, backend, health, request.path_qs, data,
                                       request_headers(request.headers, backend), client, outcome,
                                       body.get("model"))
        except _Retry as r:
            last_error = r.cause
            health.mark_down(r.cause.message)
            log.warning("backend %s failed before answering (send %d of %d): %s",
                        backend.name, attempt + 1, MAX_SENDS, r.cause.message)
    gw.metrics.rejections.labels("backend_down").inc()
    raise Overloaded(f"{last_error.message if last_error else 'backend failed'}; "
                     f"gave up after {MAX_SENDS} sends", retry_after=gw.config.queue.retry_after_seconds)


async def _exchange(upstream: UpstreamClient, backend: BackendConfig, health: BackendHealth, path: str,
                    data: bytes, headers: dict[str, str], client: ClientStream | None, outcome: Outcome,
                    model: Any) -> web.StreamResponse:
    try:
        async with upstream.post(backend, path, data, headers) as resp:
            if resp.status != 200:
                raw = await _read_bounded(resp, 256 * 1024)
                if resp.status == 503:
                    # llama-server answers 503 while it loads its model: nothing ran.
                    health.set(State.LOADING, "loading model (HTTP 503)")
                    raise UpstreamUnavailable(f"backend {backend.name!r} is loading its model")
                raise from_upstream(resp.status, raw)
            if client is not None:
                return await _relay_stream(client, backend, health, resp, outcome, model)
            raw = await _read_bounded(resp, MAX_ANSWER_BYTES)
    except UpstreamUnavailable as e:
        raise _Retry(e) from e
    message = _observe_message(outcome, raw)
    if isinstance(message, dict) and isinstance(model, str) and message.get("model") != model:
        raw = json.dumps({**message, "model": model}, ensure_ascii=False, separators=(",", ":")).encode()
    return web.Response(body=raw, status=200, headers=_answer_headers(resp.headers))


async def _read_bounded(resp, limit: int) -> bytes:
    try:
        raw = await resp.content.read(limit + 1)
    except Exception as exc:  # noqa: BLE001 - any read failure means nothing reached the client
        raise UpstreamUnavailable(f"backend closed the connection mid-answer: {exc.__class__.__name__}") from exc
    if len(raw) > limit:
        raise UpstreamError(f"backend answer over {limit} bytes")
    return raw


def _answer_headers(upstream_headers) -> dict[str, str]:
    out = response_headers(upstream_headers)
    if not any(k.lower() == "content-type" for k in out):
        out["Content-Type"] = "application/json"
    return out


def _observe_message(outcome: Outcome, raw: bytes) -> Any:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, dict) and isinstance(message.get("usage"), dict):
        _take_usage(outcome, message["usage"])
    return message


def _take_usage(outcome: Outcome, usage: dict[str, Any]) -> None:
    def n(key: str) -> int | None:
        v = usage.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    if n("input_tokens") is not None:
        outcome.input_tokens = n("input_tokens")
    if n("cache_read_input_tokens") is not None:
        outcome.cache_read_tokens = n("cache_read_input_tokens")
    if n("output_tokens") is not None:
        outcome.output_tokens = n("output_tokens")


async def _relay_stream(client: ClientStream, backend: BackendConfig, health: BackendHealth, resp,
                        outcome: Outcome, model: Any) -> web.StreamResponse:
    parser = sse.SSEParser()
    forwarded = False
    finished = False  # message_stop or an error event seen
    echo = ModelEcho(model)
    chunks = resp.content.iter_any()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reset, payload error: the backend is gone
            if not forwarded:
                raise UpstreamUnavailable(f"backend {backend.name!r} failed before its first byte: "
                                          f"{exc.__class__.__name__}") from exc
            health.mark_down(f"stream broken: {exc.__class__.__name__}")
            break
        for event in parser.feed(chunk):
            finished |= _observe_event(outcome, event)
        chunk = echo.feed(chunk)
        if chunk:
            await client.write(chunk, resp.headers)
            forwarded = True
    if not forwarded:
        # Nothing of the answer reached the client: safe to send again.
        raise UpstreamUnavailable(f"backend {backend.name!r} closed the stream before its first event")
    if not finished:
        # The backend died mid-answer (or sent a stream that never ended):
        # tell the client, don't let it take a truncated answer for a whole one.
        outcome.status = "stream_error"
        health.mark_down("stream ended without message_stop")
        err = Overloaded(f"backend {backend.name!r} ended the stream before message_stop (did it crash?)")
        await client.write(b"\n\n" + sse.encode("error", err.body()))
    return await client.finish()


class ModelEcho:
    """Rewrites the model name in the stream's first event to the one the client asked for.

    llama-server names its GGUF path there; Claude Code expects its own model
    name back. Only the first event (message_start) is held back and rewritten;
    every byte after it passes through untouched and unbuffered.
    """

    MAX_HOLD = 1024 * 1024

    def __init__(self, model: Any) -> None:
        self.model = model if isinstance(model, str) else None
        self.pending: bytes | None = b"" if self.model else None

    def feed(self, chunk: bytes) -> bytes:
        if self.pending is None:
            return chunk
        buf = self.pending + chunk
        cut = buf.find(b"\n\n")
        if cut < 0 and len(buf) < self.MAX_HOLD:
            self.pending = buf
            return b""
        self.pending = None
        if cut < 0:
            return buf
        return self._rewrite(buf[:cut + 2]) + buf[cut + 2:]

    def _rewrite(self, block: bytes) -> bytes:
        lines = block.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                return block
            msg = data.get("message") if isinstance(data, dict) else None
            if data.get("type") != "message_start" or not isinstance(msg, dict) or msg.get("model") == self.model:
                return block
            msg["model"] = self.model
            lines[i] = b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
            return b"\n".join(lines)
        return block


def _observe_event(outcome: Outcome, event: sse.Event) -> bool:
    kind = event.event
    if kind in ("content_block_start", "content_block_delta") and outcome.first_content is None:
        outcome.first_content = time.monotonic()
    elif kind == "message_start":
        data = event.json() or {}
        _take_usage(outcome, ((data.get("message") or {}).get("usage")) or {})
    elif kind == "message_delta":
        data = event.json() or {}
        _take_usage(outcome, data.get("usage") or {})
    elif kind == "error":
        outcome.status = "stream_error"
        return True
    return kind == "message_stop"


def record(gw: Gateway, route: str, outcome: Outcome, arrived: float) -> None:
    """Account one finished request that went to a backend, and log it."""
    m, b = gw.metrics, outcome.backend
    end = time.monotonic()
    ttft = f"{outcome.first_content - arrived:.2f}s" if outcome.first_content is not None else "-"
    log.info("%s %s %s in %.2fs (ttft %s; prompt %d + %d cached, output %d)", route, b, outcome.status,
             end - arrived, ttft, outcome.input_tokens, outcome.cache_read_tokens, outcome.output_tokens)
    m.requests.labels(route, b, outcome.status).inc()
    m.duration.labels(b, route).observe(end - arrived)
    if outcome.first_content is not None:
        m.ttft.labels(b, route).observe(outcome.first_content - arrived)
        if outcome.granted is not None:
            m.upstream_ttft.labels(b).observe(outcome.first_content - outcome.granted)
        gen_time = end - outcome.first_content
        if outcome.output_tokens > 1 and gen_time > 0:
            m.tokens_per_second.labels(b).observe(outcome.output_tokens / gen_time)
    # Anthropic's usage: input_tokens excludes the tokens read from cache.
    m.prompt_tokens.labels(b, "hit").inc(outcome.cache_read_tokens)
    m.prompt_tokens.labels(b, "miss").inc(outcome.input_tokens)
    m.output_tokens.labels(b).inc(outcome.output_tokens)
