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
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import aiohttp
from aiohttp import web

from . import inflight, sse
from .affinity import Pool, conversation_key
from .client_stream import ClientGone, ClientStream
from .config import BackendConfig, Config
from .bodies import INLINE_BYTES
from .counting import TokenCounter
from .errors import (
    GatewayError,
    Overloaded,
    UpstreamError,
    UpstreamUnavailable,
    from_upstream,
)
from .health import BackendHealth, State
from .kvsave import KvPersistence
from .metrics import Metrics
from .routing import Route, forwarded_body, utf8_json
from .release import wait_released
from .slots import Lease, Priority, SlotQueue, pick_queue
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
    # Slots held after their client left, until the backend lets go (release.py).
    releasing: set[asyncio.Task] = field(default_factory=set)
    # The sends in progress on each backend, whose clients are still there.
    live: dict[str, set["Call"]] = field(default_factory=dict)
    # KV persistence: told when a main request has finished, so it can save the idle slot.
    kv: KvPersistence | None = None
    # Conversation affinity for the groups of several backends (None: least busy, always).
    pool: Pool | None = None


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


@dataclass(eq=False)  # each send is its own: kept in sets by identity
class Call:
    """One send to a backend, as far as the backend's slot is concerned."""

    sent: bool = False       # the request went out: the backend may be working on it
    answered: bool = False   # the backend's answer began (it had the request in a slot)
    complete: bool = False   # its answer was read to the end: the backend is done with it

    @property
    def abandoned(self) -> bool:
        return self.sent and not self.complete


class _Retry(Exception):
    def __init__(self, cause: UpstreamUnavailable):
        self.cause = cause


async def forward(request: web.Request, gw: Gateway, body: dict[str, Any], raw: bytes, route: Route,
                  arrived: float) -> web.StreamResponse:
    """Send through the least busy backend of the route's group; account the outcome on every path."""
    outcome = Outcome(route.backends[0], status="client_gone")
    inflight.attach(outcome, route.kind.value, route.priority.name.lower())  # issue 20: the dashboard follows it
    client = ClientStream(request, gw.config.gateway.ping_interval_seconds) if body.get("stream") is True else None
    try:
        if client is not None:
            client.keep_alive()
        response = await _forward(request, gw, body, raw, route, outcome, client)
        if outcome.status == "client_gone":
            outcome.status = "200"
        return response
    except ClientGone as gone:
        gw.metrics.disconnects.labels("in_slot").inc()
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
    # The conversation's key (a hash of its prefix: a serialisation of its tools) is computed only
    # when a pool's affinity, a KV save or a restore needs it, never otherwise on the request's path.
    strip = gw.config.routing.strip_billing_header
    conversation = functools.cache(functools.partial(conversation_key, body, strip))
    pooled = gw.pool is not None and len(group) > 1
    if pooled and len(raw) > INLINE_BYTES:
        key = await asyncio.to_thread(conversation)
        conversation = functools.cache(lambda: key)
    for attempt in range(MAX_SENDS):
        # Picked again for a retry: the failed backend's queue is held now, so
        # another backend of the group takes the request (and its conversation moves there).
        queue = _pick(gw, group, conversation if pooled else None)
        enqueued = time.monotonic()
        try:
            queue, lease = await _acquire(gw, group, queue, route.priority, attempt > 0, conversation, pooled,
                                          len(raw))
        except Overloaded as e:
            gw.metrics.rejections.labels(getattr(e, "reason", "queue_full")).inc()
            if last_error is not None:
                e.message += f" (last failure: {last_error.message})"
            raise
        except asyncio.CancelledError:
            gw.metrics.disconnects.labels("queued").inc()
            raise
        backend = gw.config.backend(queue.name)
        health = gw.health[backend.name]
        outcome.backend = backend.name
        kv = gw.kv if gw.kv is not None and gw.kv.enabled(backend.name) else None
        outcome.reset(granted=time.monotonic())
        gw.metrics.queue_wait.labels(backend.name, priority).observe(outcome.granted - enqueued)
        try:
            with in_slot(gw, backend, queue, lease) as call:
                rewrite = functools.partial(forwarded_body, body, raw, strip_billing=strip,
                                            max_output_tokens=backend.max_output_tokens)
                # A rewrite that cannot splice re-serialises the body: a large one off the event loop.
                data = rewrite() if len(raw) <= INLINE_BYTES else await asyncio.to_thread(rewrite)
                response = await _exchange(gw.upstream, backend, health, request.path_qs, data,
                                           request_headers(request.headers, backend, gw.config.gateway.api_key),
                                           client, outcome, body.get("model"), call)
                if call.complete and outcome.status != "stream_error":
                    # A whole answer: its conversation lives on this backend now, and may be saved.
                    if pooled:
                        gw.pool.served(conversation(), backend.name, time.monotonic() - outcome.granted)
                    if kv is not None:
                        kv.finished(backend.name, conversation,
                                    outcome.input_tokens + outcome.cache_read_tokens + outcome.output_tokens)
                return response
        except _Retry as r:
            last_error = r.cause
            health.mark_down(r.cause.message)
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


def _pick(gw: Gateway, group: list[SlotQueue], conversation) -> SlotQueue:
    """The backend of the route's group for this request: in a pool, the conversation's own
    (affinity.py); else, or without a conversation, the least busy."""
    if conversation is None:
        return pick_queue(group)
    choice = gw.pool.choose(group, conversation())
    gw.metrics.affinity.labels(choice.queue.name, choice.decision.value).inc()
    return choice.queue


async def _acquire(gw: Gateway, group: list[SlotQueue], queue: SlotQueue, priority: Priority, front: bool,
                   conversation, pooled: bool, size: int) -> tuple[SlotQueue, Lease]:
    """A slot of `queue`. In a pool, a request waiting for a backend that goes down moves to
    another backend of the pool that is up, instead of waiting for its own to come back."""
    while True:
        kv = gw.kv if gw.kv is not None and gw.kv.enabled(queue.name) else None
        with kv.waiting(queue.name, conversation) if kv is not None else contextlib.nullcontext():
            if not pooled:
                lease = await queue.acquire(priority, front=front, size=size)
                return queue, lease
            lease = await _acquire_unless_down(gw, group, queue, priority, front, size)
        if lease is not None:
            return queue, lease
        # Moved: it waited already, so it goes ahead of the newcomers of its class there.
        queue, front = _pick(gw, group, conversation), True


async def _acquire_unless_down(gw: Gateway, group: list[SlotQueue], queue: SlotQueue, priority: Priority,
                               front: bool, size: int) -> Lease | None:
    """`queue.acquire`, or None (move) once its backend is down or failed while another backend of
    the group is up: when it goes down, or when another one comes back while it is down."""
    me = asyncio.current_task()
    moved = False

    def elsewhere() -> bool:
        return not queue.is_open and any(q.is_open for q in group if q is not queue)

    async def watch() -> None:
        nonlocal moved
        while True:
            # Every backend of the group: the one waited for going down, or another coming back.
            events = [gw.health[q.name].changed for q in group]  # a new Event after every change
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if elsewhere():
                moved = True
                me.cancel()
                return

    if elsewhere():
        return None
    # The wait runs in this task (not a task of its own) so that it is in the queue before the
    # next request picks: its pick sees this one waiting.
    watcher = asyncio.create_task(watch(), name=f"move-watch:{queue.name}")
    try:
        return await queue.acquire(priority, front=front, size=size)
    except asyncio.CancelledError:
        # Ours alone (no other cancellation pending, e.g. the client leaving): move.
        if moved and me.uncancel() == 0:
            return None
        raise
    except Overloaded:
        # Its backend failed for good (FATAL, or down past the grace) and told its waiters so;
        # another backend of the group can still take the request.
        if elsewhere():
            return None
        raise
    finally:
        watcher.cancel()


@contextlib.contextmanager
def in_slot(gw: Gateway, backend: BackendConfig, queue: SlotQueue, lease: Lease) -> Iterator[Call]:
    """One send in a granted slot, counted among the backend's live sends while it runs. After it the
    slot is free, or, if the backend may still be working on an abandoned request, held until it
    lets go (release.py), so no second generation overlaps it."""
    call = Call()
    live = gw.live.setdefault(backend.name, set())
    live.add(call)
    try:
        yield call
    finally:
        live.discard(call)
        if call.abandoned:
            release_when_idle(gw, backend, queue, lease, call)
        else:
            lease.release()


def release_when_idle(gw: Gateway, backend: BackendConfig, queue: SlotQueue, lease: Lease, call: Call) -> None:
    """Hold the slot until the backend has let go of the abandoned request (release.py)."""
    left = time.monotonic()
    health = gw.health[backend.name]

    def late(waited: float) -> None:
        message = (f"still processing a request abandoned {waited:.0f}s ago "
                   f"(gateway.release_timeout_seconds = {gw.config.gateway.release_timeout_seconds:g}); "
                   f"its slot stays busy until it lets go")
        health.last_error = message
        log.warning("backend %s: %s", backend.name, message)

    def others() -> int:
        # What the backend may legitimately be processing besides abandoned requests: the live
        # sends it has begun to answer. A live send it has not answered yet, if already
        # processing, only makes the wait longer; another abandoned one must not count.
        return sum(1 for c in gw.live.get(backend.name, ()) if c.answered)

    async def hold() -> None:
        try:
            released = await wait_released(gw.upstream, backend, others=others,
                                           answered=call.answered,
                                           late_after=gw.config.gateway.release_timeout_seconds, on_late=late)
            gw.metrics.release_wait.labels(backend.name, released.value).observe(time.monotonic() - left)
        finally:
            lease.release()

    task = asyncio.create_task(hold(), name=f"release:{backend.name}")
    gw.releasing.add(task)
    task.add_done_callback(gw.releasing.discard)


async def _exchange(upstream: UpstreamClient, backend: BackendConfig, health: BackendHealth, path: str,
                    data: bytes, headers: dict[str, str], client: ClientStream | None, outcome: Outcome,
                    model: Any, call: Call) -> web.StreamResponse:
    call.sent = True
    try:
        async with upstream.post(backend, path, data, headers) as resp:
            if resp.status != 200:
                raw = await read_whole(resp, 256 * 1024, backend)
                call.complete = True
                if resp.status == 503:
                    # llama-server answers 503 while it loads its model: nothing ran.
                    health.set(State.LOADING, "loading model (HTTP 503)")
                    raise UpstreamUnavailable(f"backend {backend.name!r} is loading its model")
                raise from_upstream(resp.status, raw, resp.headers.get("Retry-After"))
            ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if client is not None:
                if ctype != "text/event-stream":
                    raise UpstreamError(f"backend {backend.name!r} answered a streaming request with "
                                        f"{ctype or 'no Content-Type'}, not text/event-stream")
                return await _relay_stream(client, backend, health, resp, outcome, model, call)
            raw = await read_whole(resp, MAX_ANSWER_BYTES, backend)
            call.complete = True
    except UpstreamUnavailable as e:
        raise _Retry(e) from e
    message = _observe_message(outcome, raw)
    if isinstance(message, dict) and _anthropic_error(message):
        raise from_upstream(502, raw)
    if not isinstance(message, dict) or message.get("type") != "message":
        raise UpstreamError(f"backend {backend.name!r} answered 200 with {len(raw)} bytes that are not an "
                            f"Anthropic message ({ctype or 'no Content-Type'})")
    if isinstance(model, str) and message.get("model") != model:
        raw = utf8_json({**message, "model": model})
    return web.Response(body=raw, status=200, headers=_answer_headers(resp.headers))


async def read_whole(resp, limit: int, backend: BackendConfig) -> bytes:
    """The whole answer body, however many reads it takes; a cut one is a failure, never an answer."""
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise UpstreamError(f"backend {backend.name!r} answer is over {limit} bytes (the gateway's limit)")
    except (aiohttp.ClientError, OSError) as exc:
        # The backend died mid-answer; nothing of it reached the client.
        raise UpstreamUnavailable(f"backend {backend.name!r} closed the connection mid-answer after {len(buf)} "
                                  f"bytes: {exc.__class__.__name__}") from exc
    return bytes(buf)


def _answer_headers(upstream_headers) -> dict[str, str]:
    out = response_headers(upstream_headers)
    if not any(k.lower() == "content-type" for k in out):
        out["Content-Type"] = "application/json"
    return out


def _observe_message(outcome: Outcome, raw: bytes) -> Any:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
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


TERMINAL = ("message_stop", "error")


async def _relay_stream(client: ClientStream, backend: BackendConfig, health: BackendHealth, resp,
                        outcome: Outcome, model: Any, call: Call) -> web.StreamResponse:
    """Forward the backend's stream whole event by whole event, each in its own bytes.

    Exactly one terminal event reaches the client: the backend's `message_stop`
    or `error`, or, when the stream breaks a rule or ends without one, an
    `error` of ours. Nothing after the terminal event is forwarded.
    """
    parser = sse.SSEParser()
    rename = model if isinstance(model, str) else None
    chunks = resp.content.iter_any()
    terminal: str | None = None
    problem: str | None = None
    eof = False
    while terminal is None and problem is None and not eof:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            chunk, eof = b"", True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reset, payload error: the backend is gone
            if not call.answered:
                raise UpstreamUnavailable(f"backend {backend.name!r} failed before its first event: "
                                          f"{exc.__class__.__name__}") from exc
            health.mark_down(f"stream broken: {exc.__class__.__name__}")
            outcome.status = "stream_error"
            raise Overloaded(f"backend {backend.name!r} broke off its stream ({exc.__class__.__name__}): "
                             f"did it crash?") from exc
        try:
            blocks = parser.feed(chunk, eof=eof)
        except sse.EventTooLarge as e:
            blocks, problem = [], f"backend {backend.name!r} sent {e}"
        out: list[bytes] = []
        for block in blocks:
            ev = block.event
            if ev is not None:
                data = ev.json()
                if not isinstance(data, dict):
                    problem = (f"backend {backend.name!r} sent a {ev.event!r} event whose data is not a JSON "
                               f"object: {ev.data[:200]!r}")
                    break
                _observe_event(outcome, ev.event, data)
                if ev.event == "message_start" and rename and _rename(data, rename):
                    block = sse.Block(sse.encode(ev.event, data), ev)
                elif ev.event == "error" and not _anthropic_error(data):
                    block = sse.Block(sse.encode("error", _as_anthropic_error(data)), ev)
                call.answered = True
            out.append(block.raw)
            if ev is not None and ev.event in TERMINAL:
                terminal = ev.event
                break
        if out:
            await client.write(b"".join(out), resp.headers)
    if terminal is None and problem is None and not call.answered:
        # Nothing of the answer reached the client: safe to send again.
        raise UpstreamUnavailable(f"backend {backend.name!r} closed the stream before its first event")
    if terminal == "message_stop":
        await _drain(resp, call)
    elif terminal == "error":
        outcome.status = "stream_error"
        await _drain(resp, call)
    else:
        # The backend died mid-answer, ended without message_stop, or broke a
        # rule: the client is told (an SSE error once its stream has begun);
        # a truncated answer must not pass for a whole one.
        outcome.status = "stream_error"
        if problem is None:
            health.mark_down("stream ended without message_stop")
            raise Overloaded(f"backend {backend.name!r} ended the stream before message_stop (did it crash?)")
        log.warning("%s", problem)
        raise UpstreamError(problem)
    return await client.finish()


async def _drain(resp, call: Call, timeout: float = 1.0) -> None:
    """Read what follows the terminal event (normally nothing) so the backend's
    answer counts as complete and its slot as free at once."""
    try:
        async with asyncio.timeout(timeout):
            while await resp.content.readany():
                pass
        call.complete = True
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass


def _rename(data: dict[str, Any], model: str) -> bool:
    """Set message_start's model to the client's name (llama-server names its GGUF path); True if changed."""
    msg = data.get("message")
    if data.get("type") != "message_start" or not isinstance(msg, dict) or msg.get("model") == model:
        return False
    msg["model"] = model
    return True


def _anthropic_error(data: dict[str, Any]) -> bool:
    return data.get("type") == "error" and isinstance(data.get("error"), dict)


def _as_anthropic_error(data: dict[str, Any]) -> dict[str, Any]:
    """llama-server's error event carries an OpenAI-shaped error; Claude Code reads Anthropic's."""
    code = data.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return from_upstream(status, json.dumps({"error": data}).encode()).body()


def _observe_event(outcome: Outcome, kind: str, data: dict[str, Any]) -> None:
    if kind in ("content_block_start", "content_block_delta") and outcome.first_content is None:
        outcome.first_content = time.monotonic()
    elif kind == "message_start":
        msg = data.get("message")
        usage = msg.get("usage") if isinstance(msg, dict) else None
        if isinstance(usage, dict):
            _take_usage(outcome, usage)
    elif kind == "message_delta":
        usage = data.get("usage")
        if isinstance(usage, dict):
            _take_usage(outcome, usage)


def record(gw: Gateway, route: str, outcome: Outcome, arrived: float, *, count_tokens: bool = True) -> None:
    """Account one finished request that went to a backend, and log it (its tokens too, unless
    the caller counted them)."""
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
    if not count_tokens:
        return
    # Anthropic's usage: input_tokens excludes the tokens read from cache.
    m.prompt_tokens.labels(b, "hit").inc(outcome.cache_read_tokens)
    m.prompt_tokens.labels(b, "miss").inc(outcome.input_tokens)
    m.output_tokens.labels(b).inc(outcome.output_tokens)
