"""bench_overhead.py's processes: the instant fake engine (testkit.engine) and the gateway as
`orchestrator serve --config` runs it, plus a probe of its event loop, each in its own process so
what is timed is the gateway's own work.

    python bench/overhead_procs.py --_gateway CONFIG PORT
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from orchestrator.http.app import create_app, start
from testkit.servers import free_port, stop_process, wait_http


# ---- the gateway with a loop-lag probe (own process) -------------------------------------------

def run_gateway(config_path: str, port: int) -> None:
    """The gateway as `orchestrator serve --config` runs it, plus GET /_bench/lag: the longest the
    event loop was kept from running a 1 ms timer since the last read (ms)."""
    from orchestrator.configfile import load_config, with_overrides

    config = with_overrides(load_config(config_path, os.environ), {"port": port})

    async def main() -> None:
        worst = [0.0]

        async def probe() -> None:
            loop = asyncio.get_running_loop()
            while True:
                t = loop.time()
                await asyncio.sleep(0.001)
                worst[0] = max(worst[0], loop.time() - t - 0.001)

        async def lag(request: web.Request) -> web.Response:
            value, worst[0] = worst[0], 0.0
            return web.json_response({"max_ms": value * 1000})

        app = create_app(config)
        app.router.add_get("/_bench/lag", lag)
        task = asyncio.create_task(probe())
        runner = await start(app, config.gateway.host, config.gateway.port)
        try:
            await asyncio.Event().wait()
        finally:
            task.cancel()
            await runner.cleanup()

    asyncio.run(main())


class Procs:
    """Child processes of this run, all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []

    def spawn(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "ab")
        script = list(args) if args[0] == "-m" else [__file__, *args]
        p = subprocess.Popen([sys.executable, *script], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def fake(self) -> str:
        """The instant fake engine: bodies read, never parsed, answers at once. Per request, in the
        query (which the gateway passes on as it came): `x_fake_stream` streams `x_fake_parts` deltas,
        one write each (as llama-server writes tokens); `x_fake_hold` waits at the fake's gate
        (POST /fake/gate/close, /fake/gate/open): a slot held, streams kept open."""
        port = free_port()
        self.spawn("-m", "testkit.engine", str(port), log="fake.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health")
        return url

    def gateway(self, upstream: str, *, slots: int = 1, max_depth: int | None = None,
                max_connections: int | None = None, name: str = "gw") -> tuple[str, subprocess.Popen]:
        port = free_port()
        cfg = self.tmp / f"{name}.toml"
        lines = ['[[backends]]', 'name = "primary"', f'url = "{upstream}"', f"slots = {slots}", "kv_save = false"]
        if max_connections:
            lines = ["[gateway]", f"max_connections = {max_connections}", *lines]
        if max_depth is not None:
            lines += ["[queue]", f"max_depth = {max_depth}"]
        cfg.write_text("\n".join(lines) + "\n")
        p = self.spawn("--_gateway", str(cfg), str(port), log=f"{name}.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health")
        return url, p

    def stop(self, p: subprocess.Popen) -> None:
        stop_process(p)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.stop(p)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_gateway"]:
        run_gateway(sys.argv[2], int(sys.argv[3]))
