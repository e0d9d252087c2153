"""Side-by-side figures, measured in one run: llama-server direct versus through the gateway.

    make bench        (or: .venv/bin/python bench/bench_gateway.py)

Starts its own llama-server (SmolLM2-135M, --parallel 1) and gateway on free
127.0.0.1 ports, then prints, for the same requests:
  1. the second turn of a Claude Code conversation: time and prompt tokens processed, direct (the
     billing line differs per request, as Claude Code sends it) vs through the
     gateway (line dropped, prompt cache hit);
  1b. a main turn sent just after six of Claude Code's background calls;
  2. gateway overhead on a tiny request (median of N);
  3. what the server sees under 6 concurrent requests: most in flight at once;
  4. the gateway's resident memory before and after a 40-request burst;
then (bench_kv.py) two supervised stacks, KV saving on and off, for the time to
first token of a cold turn, a warm one, the first after `kill -SEGV` with and
without the restore, and what a save adds to a tool-loop turn.

    bench_gateway.py --no-kv | --kv-only      (one part alone)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import sys
import time

import aiohttp

import bench_kv

from orchestrator.ops.supervise import find_llama_server
from testkit.bench import llama_and_gateway, rss_kb
from testkit.bodies import claude_turn
from testkit.client import FIXTURES as SAMPLES


async def post(http, url, body, path="/v1/messages"):
    t0 = time.perf_counter()
    async with http.post(url + path, json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:300]
    return time.perf_counter() - t0, raw


async def peak_in_flight(http, llama: str, work) -> float:
    seen, stop = [], asyncio.Event()

    async def watch():
        while not stop.is_set():
            async with http.get(llama + "/metrics") as r:
                text = await r.text()
            seen.append(sum(float(re.search(rf"^llamacpp:{n} (\S+)$", text, re.M).group(1))
                            for n in ("requests_processing", "requests_deferred")))
            await asyncio.sleep(0.02)

    w = asyncio.create_task(watch())
    await work
    stop.set()
    await w
    return max(seen)


async def main() -> None:
    binary = os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or find_llama_server()
    if not binary:
        sys.exit("no llama-server: run deploy/install-llama-server.sh (make bench does)")
    t0 = time.monotonic()
    if "--kv-only" not in sys.argv:
        await gateway_cases(binary)
    if "--no-kv" not in sys.argv:
        print()
        print("\n".join(await bench_kv.run(binary)))
    print(f"\n(bench run: {time.monotonic() - t0:.0f} s)")


async def gateway_cases(binary: str) -> None:
    with llama_and_gateway(binary, "--metrics") as (llama, gateway, gateway_pid):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=600)) as http:
            await report(http, llama, gateway, gateway_pid)


async def report(http, llama: str, gateway: str, gateway_pid: int) -> None:
    rows = []
    # 1. The second turn of a Claude Code conversation.
    results = {}
    for name, url in (("direct", llama), ("gateway", gateway)):
        await post(http, url, claude_turn(f"{name}1", 1))          # turn one fills the cache
        t, raw = await post(http, url, claude_turn(f"{name}2", 2))  # turn two: a new billing line
        usage = json.loads(raw)["usage"]
        results[name] = (t, usage["input_tokens"], usage.get("cache_read_input_tokens", 0))
    (td, pd, cd), (tg, pg, cg) = results["direct"], results["gateway"]
    rows.append(("turn-2 wall time (s)", f"{td:.2f}", f"{tg:.2f}", f"{td / tg:.1f}x faster"))
    rows.append(("turn-2 prompt tokens processed", str(pd), str(pg), f"{pd / max(pg, 1):.0f}x fewer"))
    rows.append(("turn-2 prompt tokens from cache", str(cd), str(cg), ""))

    # 1b. A main turn sent while Claude Code's background calls (3 titles, 3 topic
    # checks; max_tokens cut to 64 here so the direct case ends in seconds) arrive.
    background = []
    for _ in range(3):
        title = json.loads((SAMPLES / "title-2.1.332.json").read_text())["body"]
        topic = json.loads((SAMPLES / "topic-2.0.77.json").read_text())["body"]
        background += [{**title, "max_tokens": 64, "stream": False}, {**topic, "max_tokens": 64, "stream": False}]
    main_times = {}
    for name, url in (("direct", llama), ("gateway", gateway)):
        bg = [asyncio.create_task(post(http, url, b)) for b in background]
        await asyncio.sleep(0.05)  # the background calls are first in line, as Claude Code sends them
        main_times[name], _ = await post(http, url, claude_turn(f"{name}3", 2))
        await asyncio.gather(*bg)
    rows.append(("main turn behind 6 background calls (s)", f"{main_times['direct']:.2f}",
                 f"{main_times['gateway']:.2f}", f"{main_times['direct'] / main_times['gateway']:.1f}x faster"))

    # 2. Overhead on a tiny request.
    tiny = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    n = 20
    times = {name: [] for name in ("direct", "gateway")}
    for _ in range(n):
        for name, url in (("direct", llama), ("gateway", gateway)):
            times[name].append((await post(http, url, tiny))[0])
    md, mg = statistics.median(times["direct"]), statistics.median(times["gateway"])
    rows.append((f"tiny request, median of {n} (ms)", f"{md * 1000:.1f}", f"{mg * 1000:.1f}",
                 f"+{(mg - md) * 1000:.1f} ms ({mg / md:.2f}x)"))

    # 3. Six concurrent requests: what the server sees at once.
    story = {"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": "Tell a story"}]}
    peaks = {}
    for name, url in (("direct", llama), ("gateway", gateway)):
        peaks[name] = await peak_in_flight(http, llama, asyncio.gather(*[post(http, url, story) for _ in range(6)]))
    rows.append(("6 concurrent: most at once on the server", f"{peaks['direct']:.0f}", f"{peaks['gateway']:.0f}",
                 "the slot count, never more"))

    # 4. Gateway memory across a burst of 40 mixed requests.
    before = rss_kb(gateway_pid)
    title = json.loads((SAMPLES / "title-2.1.332.json").read_text())["body"]
    count = json.loads((SAMPLES / "count_tokens-2.1.197.json").read_text())["body"]
    burst = [post(http, gateway, {**story, "max_tokens": 4}) for _ in range(5)]
    burst += [post(http, gateway, title) for _ in range(10)]
    burst += [post(http, gateway, count, "/v1/messages/count_tokens") for _ in range(25)]
    await asyncio.gather(*burst)
    after = rss_kb(gateway_pid)
    rows.append(("gateway RSS before/after 40-request burst (MiB)", f"{before / 1024:.1f}", f"{after / 1024:.1f}",
                 f"{after / before:.2f}x"))

    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'direct':>10}  {'gateway':>10}  ratio")
    for label, a, b, ratio in rows:
        print(f"{label:<{width}}  {a:>10}  {b:>10}  {ratio}")


if __name__ == "__main__":
    asyncio.run(main())
