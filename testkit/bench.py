"""What every benchmark needs: the machine it ran on, a process's memory and CPU time, a table
printed, and a real llama-server with a gateway in front of it."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import aiohttp

from .servers import free_port, wait_http


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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))).rstrip())


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
