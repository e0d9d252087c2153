"""The walk of one request through the gateway's code: which modules it enters, in what order, and how
often it goes back to a module it had left. docs/architecture.md gives its figures; anyone can run it
again (`python bench/bench_walk.py`, a few seconds once llama-server is built).

How it counts: the gateway runs in this process in front of a real llama-server (the default model),
and `sys.setprofile` records every call of a function in the package's files made by the task that
handles one `POST /v1/messages` (Claude Code's real main request, a warm turn, streamed
and not). A *stay* is a run of consecutive records in one module; a *return* is a stay in a module the
walk had already left. By package, the same counts leave out the core's modules at the top level
(config, sse, jsonvalues, ...), which every package looks things up in. A coroutine resumed after an await is no new call (every await resumes the
whole chain of coroutines above it, middlewares included, which says how asyncio runs, not how the
code is laid out), so a frame is counted once, when it is entered. Work the request hands to other tasks or threads (a KV save, hashing a big
body in a thread) is not in its walk: the walk is the request's own way, as a reader follows it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

import orchestrator
from orchestrator.configfile import config_from_dict
from testkit.bench import machine
from testkit.bodies import claude_turn
from testkit.servers import free_port, wait_http

try:  # the package's layout since issue 25; before it, one flat folder (to measure an older checkout)
    from orchestrator.http.app import create_app, start
    from orchestrator.ops.supervise import default_model
except ImportError:
    from orchestrator.app import create_app, start  # type: ignore[no-redef]
    from orchestrator.supervise import default_model  # type: ignore[no-redef]

PACKAGE = Path(orchestrator.__file__).resolve().parent
ROOT = PACKAGE.parent


def module_of(filename: str) -> str | None:
    """The package's dotted module for a code file, None outside the package."""
    path = Path(filename)
    try:
        rel = path.resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    return ".".join(rel.with_suffix("").parts)


class Walk:
    """The modules one task enters, in order (see the module's doc)."""

    def __init__(self) -> None:
        self.by_task: dict[int, list[str]] = {}
        # Frames entered, kept alive until the walk ends so that no new frame reuses an id.
        self.entered: dict[int, object] = {}

    def profile(self, frame, event, arg) -> None:
        if event != "call" or id(frame) in self.entered:
            return
        self.entered[id(frame)] = frame
        module = module_of(frame.f_code.co_filename)
        if module is None:
            return
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return
        if task is not None:
            self.by_task.setdefault(id(task), []).append(module)

    def request_walk(self) -> list[str]:
        """The walk of the task that ran the /v1/messages handler."""
        handler = [w for w in self.by_task.values() if any(m.endswith("handlers") for m in w)]
        return max(handler, key=len) if handler else []


def stays(walk: list[str]) -> list[str]:
    out: list[str] = []
    for m in walk:
        if not out or out[-1] != m:
            out.append(m)
    return out


def summary(walk: list[str]) -> dict:
    runs = stays(walk)
    seen: set[str] = set()
    returns = 0
    for i, m in enumerate(runs):
        if m in seen:
            returns += 1
        if i:
            seen.add(runs[i - 1])
    return {"stays": len(runs), "modules": len(set(runs)), "returns": returns, "runs": runs,
            "per_module": Counter(runs)}


def llama_server_binary() -> str:
    if path := os.environ.get("ORCHESTRATOR_LLAMA_SERVER"):
        return path
    out = subprocess.run([str(ROOT / "deploy" / "install-llama-server.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable})
    return out.stdout.strip().splitlines()[-1]


async def walk_once(gateway: str, body: dict) -> list[str]:
    walk = Walk()
    async with aiohttp.ClientSession() as http:
        sys.setprofile(walk.profile)
        try:
            async with http.post(gateway + "/v1/messages", json=body,
                                 headers={"anthropic-version": "2023-06-01"}) as r:
                await r.read()
                assert r.status == 200, r.status
        finally:
            sys.setprofile(None)
    return walk.request_walk()


async def main_async(llama: str, show: bool) -> None:
    config = config_from_dict({"backends": [{"name": "primary", "url": llama}],
                               "gateway": {"health_interval_seconds": 5}})
    app = create_app(config, CollectorRegistry())
    runner = await start(app, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    gateway = f"http://{host}:{port}"
    try:
        for stream in (False, True):
            body = {**claude_turn("walk0", 1), "stream": stream}
            await walk_once(gateway, body)  # cold: the prompt's first prefill, the pools' first use
            walk = await walk_once(gateway, {**claude_turn("walk1", 1), "stream": stream})
            s = summary(walk)
            kind = "streamed" if stream else "not streamed"
            # The core's modules (config, errors, sse, ...) are looked up from every room: not rooms.
            packages = summary([p for m in stays(walk) if (p := m.rpartition(".")[0])])
            print(f"{kind:13s}: {s['stays']} stays in {s['modules']} modules, {s['returns']} of them returns "
                  f"to a module already left; by package: {packages['stays']} stays in {packages['modules']}, "
                  f"{packages['returns']} returns")
            if show:
                print("  " + " -> ".join(s["runs"]))
                print("  by package: " + " -> ".join(packages["runs"]))
                print("  stays per module: " + ", ".join(f"{m} {n}" for m, n in s["per_module"].most_common()))
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print the walk itself, module by module")
    args = parser.parse_args()
    print(machine())
    port = free_port()
    llama = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "llama.log", "wb") as log:
        proc = subprocess.Popen([llama_server_binary(), "--model", default_model(), "--host", "127.0.0.1",
                                 "--port", str(port), "--ctx-size", "8192", "--parallel", "1", "--threads", "2",
                                 "--no-webui", "--seed", "1", "--slots"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(llama + "/health")
            asyncio.run(main_async(llama, args.show))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
