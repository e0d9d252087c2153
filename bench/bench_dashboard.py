"""What one open dashboard page costs the gateway (issue 20): CPU of the gateway process per second.

    make bench        (or: .venv/bin/python bench/bench_dashboard.py [--seconds N])

Starts its own llama-server (SmolLM2, --parallel 1, with /slots) and gateway, answers a few requests so
the page has recent requests and history to send, then measures the gateway's CPU time (utime + stime
from /proc) over the same wall time twice, interleaved: idle, and with one page polling
`/dashboard/api/state` every second as the page's script does (the page's own files are cached by the
browser; the state is what it asks for each second). The difference is the page's cost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp

from orchestrator.ops.supervise import find_llama_server
from testkit.bench import cpu_seconds, llama_and_gateway, machine
from testkit.servers import ROOT

SHORT = {"model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}




async def window(http, gateway: str, pid: int, seconds: float, poll: bool) -> float:
    """CPU share of one core used by the gateway over `seconds`, with or without a page polling."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - start < seconds:
        tick = time.monotonic()
        if poll:
            async with http.get(gateway + "/dashboard/api/state") as r:
                assert r.status == 200, r.status
                await r.read()
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


async def run(binary: str, seconds: float) -> list[str]:
    with llama_and_gateway(binary, "--slots") as (llama, gateway, pid):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            for _ in range(20):
                async with http.post(gateway + "/v1/messages", json=SHORT) as r:
                    await r.read()
            async with http.get(gateway + "/dashboard") as r:
                page = len(await r.read())
            idle, polled = [], []
            for _ in range(2):  # interleaved: background noise hits both columns alike
                idle.append(await window(http, gateway, pid, seconds / 2, poll=False))
                polled.append(await window(http, gateway, pid, seconds / 2, poll=True))
            async with http.get(gateway + "/dashboard/api/state") as r:
                state = len(await r.read())
    idle_share, polled_share = sum(idle) / len(idle), sum(polled) / len(polled)
    web = ROOT / "orchestrator" / "http" / "web"
    assets = sum(p.stat().st_size for p in web.iterdir())
    return [
        "Dashboard: one open page refreshing every second, against the real llama-server",
        f"  page and assets: {assets / 1024:.1f} KB (limit 300 KB); the page {page} B; each state poll {state} B",
        f"  gateway CPU, idle:            {100 * idle_share:.2f}% of a core",
        f"  gateway CPU, one page open:   {100 * polled_share:.2f}% of a core",
        f"  the page's cost:              {100 * (polled_share - idle_share):.2f}% of a core (limit 1%)",
        f"  ({seconds:.0f} s measured, interleaved; {machine()})",
    ]


async def main() -> None:
    binary = os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or find_llama_server()
    if not binary:
        sys.exit("no llama-server: run deploy/install-llama-server.sh (make bench does)")
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 60.0
    print("\n".join(await run(binary, seconds)))


if __name__ == "__main__":
    asyncio.run(main())
