"""The app factory: resources owned by cleanup_ctx, errors rendered Anthropic-shaped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from .config import Config
from .counting import TokenCounter
from .errors import GatewayError, InvalidRequest, NotFound
from .handlers import GATEWAY, add_routes
from .health import BackendHealth, watch_for
from .metrics import Metrics
from .proxy import Gateway
from .slots import SlotQueue
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


def _error_response(err: GatewayError) -> web.Response:
    return web.Response(status=err.status, body=err.body_bytes(), content_type="application/json",
                        headers=err.headers)


@web.middleware
async def anthropic_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        return _error_response(err)
    except web.HTTPNotFound:
        return _error_response(NotFound(f"{request.method} {request.path}: no such endpoint"))
    except web.HTTPMethodNotAllowed as exc:
        return _error_response(InvalidRequest(f"{request.method} {request.path}: method not allowed "
                                              f"(allowed: {', '.join(sorted(exc.allowed_methods))})",
                                              status=405))
    except web.HTTPException as exc:
        return _error_response(GatewayError(exc.reason or str(exc), status=exc.status,
                                            error_type="invalid_request_error" if exc.status < 500 else "api_error"))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # noqa: BLE001 - the client gets an envelope, the log gets the trace
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(GatewayError("internal gateway error; see the gateway log"))


def build_gateway(config: Config, registry: CollectorRegistry) -> Gateway:
    metrics = Metrics(registry, [b.name for b in config.backends])
    upstream = UpstreamClient(connect_timeout=config.gateway.connect_timeout_seconds)
    counter = TokenCounter(upstream, timeout=config.gateway.count_tokens_timeout_seconds,
                           on_source=lambda source: metrics.count_tokens_source.labels(source).inc())
    gw = Gateway(config=config, metrics=metrics, upstream=upstream, counter=counter)
    q = config.queue
    for b in config.backends:
        queue = SlotQueue(b.name, b.slots, max_depth=q.max_depth, max_wait=q.max_wait_seconds,
                          retry_after=q.retry_after_seconds)
        gw.queues[b.name] = queue
        watch, log_file = watch_for(b, config.supervisor.socket, config.supervisor.log_dir)
        gw.health[b.name] = BackendHealth(
            b, queue, grace=q.down_grace_seconds, watch=watch, log_file=log_file,
            on_change=lambda name, state: metrics.backend_up.labels(name).set(1 if gw.health[name].up else 0),
            on_restart=lambda name: metrics.backend_restarts.labels(name).inc())
        metrics.backend_up.labels(b.name).set(1)
        metrics.watch_queue(b.name, b.slots, lambda queue=queue: queue.depth, lambda queue=queue: queue.busy)
    return gw


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await gw.upstream.start()
    yield
    await gw.upstream.close()


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    tasks = [asyncio.create_task(h.poll(gw.upstream, gw.config.gateway.health_interval_seconds),
                                 name=f"health:{name}") for name, h in gw.health.items()]
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def create_app(config: Config, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application(middlewares=[anthropic_errors])
    app[GATEWAY] = build_gateway(config, registry if registry is not None else CollectorRegistry())
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_health_ctx)
    add_routes(app)
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; returns the runner (its bound port is `runner.addresses`)."""
    # handler_cancellation: a client that disconnects while queued must leave
    # the queue, which needs its handler cancelled, not left to wait.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
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
