"""The app factory: resources owned by cleanup_ctx, errors rendered Anthropic-shaped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..backends.gateway import GATEWAY, build_gateway
from ..config import Config
from ..errors import GatewayError, InvalidRequest, NotFound, error_for_status
from .access import AccessPolicy, access_middleware
from .handlers import add_routes
from .listener import (
    MAX_FIELD_SIZE,
    MAX_LINE_SIZE,
    ConnectionGuard,
    GuardedSite,
    Limits,
)
from .page import add_dashboard, track

log = logging.getLogger(__name__)


def _error_response(err: GatewayError) -> web.Response:
    return web.Response(status=err.status, body=err.body_bytes(), content_type="application/json",
                        headers=err.headers)


@web.middleware
async def anthropic_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        response = _error_response(err)
        if not request.content.at_eof():
            # Refused before its body was read (413, 408, 401): what is left of
            # the body would be taken for the next request; close instead.
            response.force_close()
        return response
    except web.HTTPNotFound:
        return _error_response(NotFound(f"{request.method} {request.path}: no such endpoint"))
    except web.HTTPMethodNotAllowed as exc:
        return _error_response(InvalidRequest(f"{request.method} {request.path}: method not allowed "
                                              f"(allowed: {', '.join(sorted(exc.allowed_methods))})",
                                              status=405))
    except web.HTTPException as exc:
        return _error_response(error_for_status(exc.status, exc.reason or str(exc)))
    except RecursionError:
        # A body nested just under the parser's limit, walked deeper by the gateway.
        return _error_response(InvalidRequest("request body is nested too deeply"))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # noqa: BLE001 - the client gets an envelope, the log gets the trace
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(GatewayError("internal gateway error; see the gateway log"))


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await gw.upstream.start()
    yield
    await gw.upstream.close()


async def _kv_ctx(app: web.Application) -> AsyncIterator[None]:
    """KV saves: at shutdown (supervisord stops the gateway before the llama-servers on `down`),
    each backend's slot is saved if it changed, then pending saves are dropped."""
    yield
    gw = app[GATEWAY]
    for b in gw.backends.values():
        if b.kv is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await gw.kv.save(b.kv)
    await gw.kv.close()


async def _release_ctx(app: web.Application) -> AsyncIterator[None]:
    """Slots held for abandoned requests: their waits end with the app (each releases its slot)."""
    yield
    held = [t for b in app[GATEWAY].backends.values() for t in b.held]
    for t in held:
        t.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    tasks = [asyncio.create_task(b.health.poll(gw.config.gateway.health_interval_seconds),
                                 name=f"health:{b.name}") for b in gw.backends.values()]
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def _events_secret(config: Config) -> str | None:
    path = config.supervisor.events_secret_file
    if not path:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        log.warning("events secret file %s unreadable (%s): /internal/process-event refuses everyone", path, e)
        return None
    return secret or None


def create_app(config: Config, registry: CollectorRegistry | None = None) -> web.Application:
    gw = build_gateway(config, registry if registry is not None else CollectorRegistry())
    policy = AccessPolicy.from_config(config.gateway, _events_secret(config))
    refused = gw.metrics.rejections
    app = web.Application(middlewares=[anthropic_errors,
                                       access_middleware(policy, lambda reason: refused.labels(reason).inc()),
                                       track])  # /v1/messages in the dashboard's in-flight list
    app[GATEWAY] = gw
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_release_ctx)
    app.cleanup_ctx.append(_health_ctx)
    app.cleanup_ctx.append(_kv_ctx)  # last in, first out: runs while the upstream session is open
    add_routes(app)
    add_dashboard(app, config.gateway.api_key)
    return app


# aiohttp's own keep-alive default is an hour; Claude Code (undici) drops idle
# connections after a few seconds anyway. After refusing a request whose body
# is still arriving (413, 408), aiohttp reads and drops the rest for
# lingering_time before it closes, so the client sees the answer, not a reset.
# auto_decompress off: a request body is taken as sent (bodies.read_body refuses
# a compressed one), so no gzip bomb is inflated on the event loop.
HANDLER_KWARGS: dict = {"access_log": None, "keepalive_timeout": 75.0, "lingering_time": 2.0, "auto_decompress": False,
                         "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE}


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; returns the runner (its bound port is `runner.addresses`)."""
    # handler_cancellation: a client that disconnects while queued must leave
    # the queue, which needs its handler cancelled, not left to wait.
    runner = web.AppRunner(app, handler_cancellation=True, **HANDLER_KWARGS)
    await runner.setup()
    gw = app[GATEWAY]
    g = gw.config.gateway
    limits = Limits(max_connections=g.max_connections, header_timeout=g.header_timeout_seconds,
                    on_refusal=lambda reason: gw.metrics.rejections.labels(reason).inc())
    site = GuardedSite(runner, host, port, guard=ConnectionGuard(runner.server, limits, HANDLER_KWARGS))
    await site.start()
    if g.open and not g.api_key:
        log.warning("gateway.open: serving WITHOUT a key on %s:%s; anyone who can reach it uses your model",
                    host, port)
    return runner


def serve(config: Config) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = await start(create_app(config), config.gateway.host, config.gateway.port)
        log.info("orchestrator listening on %s", ", ".join(f"http://{h}:{p}" for h, p, *_ in runner.addresses))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
