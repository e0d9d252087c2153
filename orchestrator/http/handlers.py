"""HTTP handlers, kept thin: parse and refuse bad input, route, then hand over."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..backends.counting import estimate_tokens
from ..backends.gateway import GATEWAY, Backend, Gateway
from ..backends.health import State
from ..errors import GatewayError, NotFound
from ..jsonvalues import INLINE_BYTES
from ..request import background, synthetic
from ..request.accounting import record_synthetic
from ..request.exchange import Exchange
from ..request.forward import forward
from ..request.routing import Route, RouteKind, Shape, backends_for_model, choose_route
from .bodies import parse_object, parse_request, read_body
from .page import ENTRY

log = logging.getLogger(__name__)


def _background_up(gw: Gateway) -> bool:
    bg = gw.config.background_backend
    return bg is not None and gw.backends[bg.name].health.serving


def _counting_backend(gw: Gateway, model: str) -> Backend | None:
    """The backend whose tokenizer counts for this model; None when it is down (estimate at once)."""
    backend = gw.backends[backends_for_model(model, gw.config)[0]]
    return None if backend.health.state in (State.DOWN, State.FAILED) else backend


async def _count(gw: Gateway, body: dict, *, size: int = 0, raw: bytes | None = None) -> tuple[int, str]:
    """The count of `body`'s tokens and who counted (a backend's name, or "estimate")."""
    backend = _counting_backend(gw, body["model"])
    if backend is None:
        return await gw.counter.count(None, body, size=size, raw=raw), "estimate"
    n = await gw.counter.count(backend.config, body, size=size, raw=raw, model=backend.health.served.model)
    return n, backend.name


async def _parse(request: web.Request, gw: Gateway, route: str, *, needs_max_tokens: bool):
    """The request's bytes and JSON body, or an Anthropic-shaped refusal, counted."""
    g = gw.config.gateway
    try:
        raw = await read_body(request, limit=g.max_body_bytes, timeout=g.body_timeout_seconds)
        body = await parse_request(raw, needs_max_tokens=needs_max_tokens)
    except GatewayError as e:
        gw.metrics.rejections.labels({413: "too_large", 408: "timeout"}.get(e.status, "bad_request")).inc()
        gw.metrics.requests.labels(route, "none", str(e.status)).inc()
        raise
    return raw, body


async def messages(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    entry = request[ENTRY]  # begun by the page's middleware, with the request's identity
    raw, body = await _parse(request, gw, "main", needs_max_tokens=True)
    route = choose_route(body, gw.config, background_up=_background_up(gw))
    ex = Exchange(request, entry, raw, body, route)
    _account_route(gw, ex)
    if route.kind is RouteKind.BACKGROUND and route.shape in background.STRUCTURED:
        answered = await background.ask(gw, body, route, ex.arrived)
        if answered is not None:
            return synthetic.response(body, route.shape, answered[1], answered[0])
        ex.route = Route(RouteKind.SYNTHETIC, route.shape)
    if ex.route.kind is RouteKind.SYNTHETIC:
        return await answer_synthetic(gw, ex)
    return await forward(gw, ex)


def _account_route(gw: Gateway, ex: Exchange) -> None:
    """Say why the request goes where it goes: in the log, and in metrics with bounded labels."""
    route, ident, model = ex.route, ex.identity, ex.model
    gw.metrics.routes.labels(route.kind.value, route.reason.value).inc()
    gw.metrics.requesters.labels(ident.kind).inc()
    # e.g. `agent 'claude-haiku-4-5' -> main primary (background_name_work; session 295830f4 agent a7c34fb6)`
    backends = f" {','.join(route.backends)}" if route.backends else ""
    who = f"; {ident.describe()}" if ident.session else ""
    log.info("%s %r -> %s%s (%s%s)", ident.kind, model[:64] if isinstance(model, str) else model,
             route.kind.value, backends, route.reason.value, who)


async def answer_synthetic(gw: Gateway, ex: Exchange) -> web.StreamResponse:
    body, size, shape = ex.body, ex.size, ex.route.shape
    if shape is Shape.COUNT_PROBE:
        input_tokens, _ = await _count(gw, body, size=size)
    elif size <= INLINE_BYTES:
        input_tokens = estimate_tokens(body)
    else:
        input_tokens = await asyncio.to_thread(estimate_tokens, body)
    try:
        response = synthetic.response(body, shape, input_tokens)
    except GatewayError as e:
        # A schema asking for more than the gateway answers.
        gw.metrics.rejections.labels("bad_request").inc()
        gw.metrics.requests.labels("synthetic", "gateway", str(e.status)).inc()
        raise
    record_synthetic(gw, shape.value, bool(body.get("stream")), ex.arrived)
    return response


async def count_tokens(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    raw, body = await _parse(request, gw, "count_tokens", needs_max_tokens=False)
    n, counted_by = await _count(gw, body, raw=raw)
    gw.metrics.requests.labels("count_tokens", counted_by, "200").inc()
    return web.json_response({"input_tokens": n})


async def process_event(request: web.Request) -> web.Response:
    """From `orchestrator events` (supervisord's listener, proven by its secret in access.py):
    a backend process changed state."""
    gw = request.app[GATEWAY]
    event = await parse_object(await read_body(request, limit=4096, timeout=5.0))
    for h in (b.health for b in gw.backends.values()):
        if h.watch is not None and event.get("program") in h.watch.workers:
            pid = event.get("pid")
            h.observe_worker(str(event["program"]), str(event.get("state", "")), pid if isinstance(pid, int) else None)
            h.poke()
            return web.json_response({"backend": h.backend.name, "state": h.state.value})
        if h.watch is not None and h.watch.program == event.get("program"):
            pid = event.get("pid")
            h.observe_process(str(event.get("state", "")), pid if isinstance(pid, int) else None)
            h.poke()
            return web.json_response({"backend": h.backend.name, "state": h.state.value})
    raise NotFound(f"no supervised backend runs as program {event.get('program')!r}")


async def probe(request: web.Request) -> web.Response:
    # Claude Code's start-up reachability checks: HEAD / and HEAD /api/hello.
    return web.json_response({"name": "orchestrator", "version": __version__})


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    backends = [{**b.health.snapshot(), **gw.slot_use(b), **gw.kv_view(b),
                 **({"cache": gw.misses.snapshot(b.name)} if gw.misses else {})} for b in gw.backends.values()]
    ok = all(b.health.up for b in gw.backends.values() if b.config.role == "main")
    g = gw.config.gateway
    return web.json_response({
        "status": "ok" if ok else "degraded",
        "gateway": {"version": __version__, "uptime_seconds": round(time.time() - gw.started, 1),
                    "access": {"key_required": bool(g.api_key), "open": g.open and not g.api_key}},
        "backends": backends,
        **({"pool": gw.pool.snapshot()} if gw.pool is not None else {}),
        "agents": gw.agents.snapshot(),
    })


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    for (kind, state), n in gw.agents.in_flight().items():
        gw.metrics.requesters_in_flight.labels(kind, state).set(n)
    resp = web.Response(body=generate_latest(gw.metrics.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ids: list[str] = []
    for b in gw.config.main_backends:
        literal = [m for m in b.models if not any(ch in m for ch in "*?[")]
        ids += literal or [b.name]
    data = [{"type": "model", "id": i, "display_name": i, "created_at": "1970-01-01T00:00:00Z"}
            for i in dict.fromkeys(ids)]
    return web.json_response({"data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/messages", messages)
    r.add_post("/v1/messages/count_tokens", count_tokens)
    r.add_get("/v1/models", models)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/", probe)
    r.add_get("/api/hello", probe)
    r.add_post("/internal/process-event", process_event)
