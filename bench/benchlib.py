"""What every benchmark here needs: free loopback ports, a wait for a server, the machine it ran on,
and Claude Code's real main request."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import aiohttp

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def claude_turn(cch: str, turn: int) -> dict:
    """Claude Code's real main request; turn 2 is turn 1 plus an answer and a new question."""
    body = copy.deepcopy(json.loads((SAMPLES / "main-2.1.332.json").read_text())["body"])
    body["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.332.{cch}; cc_entrypoint=cli;"
    body["tools"], body["max_tokens"], body["stream"] = body["tools"][:3], 4, False
    if turn == 2:
        body["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "Done: the tests pass."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Now add a docstring."}]}]
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, aiohttp "
            f"{aiohttp.__version__}; load average {load} (other work on the machine makes every figure noisier)")


@contextlib.contextmanager
def llama_and_gateway(binary: str, *llama_flags: str) -> Iterator[tuple[str, str, int]]:
    """A llama-server (the default model, 1 slot, 2 threads, ctx 8192) and a gateway in front of it,
    both answering: (llama-server's URL, the gateway's URL, the gateway's pid). Both stopped after."""
    from orchestrator.ops.supervise import default_model

    lport, gport = free_port(), free_port()
    llama, gateway = f"http://127.0.0.1:{lport}", f"http://127.0.0.1:{gport}"
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "llama.log", "wb") as log:
        procs = [subprocess.Popen([binary, "--model", default_model(), "--host", "127.0.0.1", "--port", str(lport),
                                   "--ctx-size", "8192", "--parallel", "1", "--threads", "2", "--no-webui",
                                   "--seed", "1", *llama_flags], stdout=log, stderr=subprocess.STDOUT)]
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "orchestrator"), "serve", "--primary-url",
                                       llama, "--port", str(gport), "--log-level", "warning"]))
        try:
            wait_http(llama + "/health")
            wait_http(gateway + "/health")
            yield llama, gateway, procs[1].pid
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
