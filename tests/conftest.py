from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from orchestrator.configfile import config_from_dict
from orchestrator.http.app import create_app, start
from testkit.engine import FakeEngine
from testkit.servers import ROOT, LlamaServer
from testkit.stack import down_leaving_nothing, Stack


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def http():
    # A bound only for a request that never ends: the real server's prefill of Claude Code's 4k-token
    # request took 138 s (30 tokens/s) on 2 cores shared with four other suites, past the 120 s this was.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


@pytest.fixture
async def upstream():
    """The gateway's HTTP client to backends, started (an engine adapter's or a health check's)."""
    from orchestrator.engines.upstream import UpstreamClient

    u = UpstreamClient(connect_timeout=1)
    await u.start()
    yield u
    await u.close()


@pytest.fixture
async def serve_app():
    """Start any aiohttp app on a free 127.0.0.1 port; returns its base URL."""
    runners = []

    async def _serve(app: web.Application, handler_cancellation: bool = True) -> str:
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield _serve
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def gateway(registry):
    """Start the real gateway app for a config dict; returns (base_url, app).
    The first gateway of a test uses the test's registry, later ones their own."""
    runners = []

    async def _start(raw: dict):
        raw = {**raw, "gateway": {"health_interval_seconds": 0.2, **raw.get("gateway", {})}}
        app = create_app(config_from_dict(raw), registry if not runners else CollectorRegistry())
        runner = await start(app, "127.0.0.1", 0)
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}", app

    yield _start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def fake(serve_app):
    """A FakeEngine on a free port: (fake, its URL)."""
    f = FakeEngine()
    return f, await serve_app(f.app())


async def gateway_with(start_gateway, url: str, **gateway_keys):
    """A gateway with one backend at `url` and these [gateway] keys: (base URL, its Gateway)."""
    from orchestrator.backends.gateway import GATEWAY

    base, app = await start_gateway({"backends": [{"name": "primary", "url": url}], "gateway": gateway_keys})
    return base, app[GATEWAY]


# ---- the real llama-server with SmolLM2, and the stack under supervisord ----------------------------

@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    server = LlamaServer(tmp_path_factory.mktemp("llama"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_small(tmp_path_factory):
    """A second real server, as a background model (one thread: the primary keeps the other)."""
    server = LlamaServer(tmp_path_factory.mktemp("llama-small"), ("--threads", "1"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_short(tmp_path_factory):
    """The real server with the default stack's grammar (deploy/short-answers.gbnf):
    SmolLM2's answers end, so Claude Code's turns do."""
    server = LlamaServer(tmp_path_factory.mktemp("llama-short"),
                         ("--grammar-file", str(ROOT / "deploy" / "short-answers.gbnf")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack(tmp_path):
    """Stacks under real supervisord, each in its own folder; none leaves a process behind."""
    stacks = []

    def make(**kw) -> Stack:
        s = Stack(tmp_path / f"stack{len(stacks)}", **kw)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        down_leaving_nothing(s)
