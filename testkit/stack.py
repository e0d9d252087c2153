"""The stack under real supervisord: a gateway and one real llama-server (SmolLM2) on free ports, in
a folder of its own, with what tests and benchmarks ask of it (pids, /health, metrics, its saves)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp

from orchestrator.configfile import load_config
from orchestrator.engines.rpc_workers import find_rpc_server
from orchestrator.ops import supervise

from .servers import free_port, llama_server_binary


class Stack:
    """`settings`: more lines for the backend's table (kv_save, kv_save_idle_seconds, ...)."""

    def __init__(self, root: Path, *, binary: str | None = None, model: str | None = None, retries: int = 3,
                 health_interval: float = 0.5, ctx_size: int = 4096, seed: bool = False, settings: str = ""):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.binary = binary
        self.gw_port, self.llama_port = free_port(), free_port()
        model_arg = model or "{default_model}"
        self.config_path = root / "orchestrator.toml"
        self.config_path.write_text(f"""
[gateway]
port = {self.gw_port}
health_interval_seconds = {health_interval}
[queue]
max_wait_seconds = 120
[[backends]]
name = "primary"
url = "http://127.0.0.1:{self.llama_port}"
command = "{{llama_server}} --model {model_arg} --host {{host}} --port {{port}} --parallel 1 --ctx-size {ctx_size} --metrics --threads 2 --no-webui{' --seed 1' if seed else ''}"
start_seconds = 1
start_retries = {retries}
{settings}
""")
        self.config = load_config(self.config_path)
        self.paths = supervise.StackPaths(root)
        self.url = f"http://127.0.0.1:{self.gw_port}"

    @property
    def slots(self) -> Path:
        """The primary's save folder."""
        return self.paths.slots(self.config.backends[0])

    def up(self) -> str:
        binary = self.binary or llama_server_binary()
        rpc_server = os.environ.get("ORCHESTRATOR_RPC_SERVER") or find_rpc_server(binary)
        return supervise.up(self.config, self.config_path, self.paths,
                            supervise.Programs(binary, rpc_server=rpc_server), timeout=60)

    def down(self) -> list[int]:
        """`down`, waiting up to 20 s for every process the stack ran: those still alive."""
        pids = self.all_pids() if supervise.running(self.paths) else []
        supervise.down(self.paths)
        deadline = time.time() + 20
        while any(supervise._alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        return [p for p in pids if supervise._alive(p)]

    def pid(self, program: str = "llama-primary") -> int:
        return supervise.rpc(self.paths).getProcessInfo(program)["pid"]

    def state(self, program: str) -> str:
        return supervise.rpc(self.paths).getProcessInfo(program)["statename"]

    def all_pids(self) -> list[int]:
        pids = [p["pid"] for p in supervise.processes(self.paths) if p["pid"]]
        return pids + [int(self.paths.pidfile.read_text())]

    async def backend(self, http) -> dict:
        async with http.get(self.url + "/health") as r:
            return (await r.json())["backends"][0]

    async def ready(self, http, restarts: int = 0, timeout: float = 300) -> dict:
        """The primary once it is ready, restarted at least `restarts` times. The bound ends only a hung
        test: a loaded machine starts a model in seconds, not minutes."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    b = await self.backend(http)
                    if b["state"] == "ready" and b["restarts"] >= restarts:
                        return b
                except (aiohttp.ClientError, KeyError, ValueError):
                    pass
                await asyncio.sleep(0.01)

    async def metric(self, http, name: str) -> float:
        """The sum of a metric's samples for the primary (or unlabelled); `name` may carry its labels."""
        async with http.get(self.url + "/metrics") as r:
            text = await r.text()
        found, total = False, 0.0
        for line in text.splitlines():
            if line.startswith((name + " ", name + "{")) and ('backend="primary"' in line or "{" not in line):
                found, total = True, total + float(line.rsplit(" ", 1)[1])
        if not found:
            raise AssertionError(f"{name} not exported")
        return total

    def newest_save(self) -> tuple[float, float, int] | None:
        """(started, written, bytes) of the newest save: its file's name carries the start (ms),
        its metadata's mtime the end."""
        metas = list(self.slots.glob("*.json")) if self.slots.exists() else []
        if not metas:
            return None
        path = max(metas, key=lambda p: p.stat().st_mtime)
        meta = json.loads(path.read_text())
        started = int(meta["file"].rsplit("-", 1)[1].split(".")[0]) / 1000
        return started, path.stat().st_mtime, meta["bytes"]


def down_leaving_nothing(s: Stack) -> None:
    """`down`, and every process the stack ran is gone within 20 s."""
    assert s.down() == [], "a process of the stack outlived `down`"


async def wait_health(http, url: str, timeout: float = 30) -> dict:
    """The gateway's /health once it answers 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            async with http.get(url + "/health") as r:
                if r.status == 200:
                    return await r.json()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("gateway /health did not answer")
