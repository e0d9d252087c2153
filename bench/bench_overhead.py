"""The gateway's own cost, measured against direct access in one run (issue #12).

    make bench        (after bench_gateway.py; or: .venv/bin/python bench/bench_overhead.py [--quick])

Five tables, each gateway versus direct, side by side, interleaved where the two are timed:
  1. small requests: added p50/p99 latency, added time to the first SSE event;
  2. real Claude Code main requests padded with conversation to 100 KB .. 30 MB: added latency, and the
     longest event-loop stall inside the gateway while one is handled;
  3. 25 concurrent count_tokens of 1 MB each, as /context sends them: the real llama-server's own
     /v1/messages/count_tokens versus through the gateway, and the content cache on a repeat;
  4. 1 .. 1,000 clients waiting on one slot: memory per waiting request, latency added per request,
     and resident memory with 200 open streams;
  5. synthetic answers per second with 16 clients; SSE relay throughput of a long answer.

Tables 1, 2, 4 and 5 run against an instant fake upstream (an aiohttp app in its own process that
reads a body without parsing it and answers at once), so what differs is the gateway's own cost.
The event-loop stall is measured inside the gateway process: it runs here with a probe task that
sleeps 1 ms in a loop and keeps the largest overshoot (`/_bench/lag` reads and resets it).
Figures on a shared 2-core machine are noisy; compare the columns of one run, not runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from overhead_procs import Procs

from testkit.bench import cpu_seconds, machine, ms, percentile, print_table, rss_kb
from testkit.bodies import encode, main_body, padded_body
from testkit.client import sample
from testkit.servers import free_port, wait_http

QUICK = "--quick" in sys.argv
# Padded body sizes of table 2; the last is just under gateway.max_body_bytes (32 MiB).
BODY_SIZES = (100_000, 1_000_000, 8_000_000) if QUICK else (100_000, 1_000_000, 8_000_000, 30_000_000)
WAITERS = (1, 10, 100) if QUICK else (1, 10, 100, 1000)
OPEN_STREAMS = 200
COUNT_BURST = 25


# ---- the five tables ---------------------------------------------------------------------------

SMALL = encode({"model": "claude-sonnet-4-5", "max_tokens": 64,
                "messages": [{"role": "user", "content": "Say hi"}]})
JSON_HEADERS = {"Content-Type": "application/json"}


async def timed_post(http: aiohttp.ClientSession, url: str, data: bytes, headers=JSON_HEADERS,
                     path: str = "/v1/messages") -> float:
    t0 = time.perf_counter()
    async with http.post(url + path, data=data, headers=headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}{path}: {r.status}")
    return time.perf_counter() - t0


async def first_event(http: aiohttp.ClientSession, url: str, data: bytes) -> float:
    t0 = time.perf_counter()
    async with http.post(url + "/v1/messages?x_fake_stream=1&x_fake_parts=3", data=data, headers=JSON_HEADERS) as r:
        buf = b""
        while b"event:" not in buf:
            chunk = await r.content.readany()
            if not chunk:
                raise RuntimeError("stream ended before its first event")
            buf += chunk
        t = time.perf_counter() - t0
        await r.read()
    return t


async def table_small(http, fake: str, gw: str) -> None:
    n = 200 if QUICK else 1000
    stream_body = encode({**json.loads(SMALL), "stream": True})
    for _ in range(50):  # warm-up: connections, code paths
        await timed_post(http, fake, SMALL)
        await timed_post(http, gw, SMALL)
    t = {k: [] for k in ("dj", "gj", "ds", "gs")}
    for _ in range(n):
        t["dj"].append(await timed_post(http, fake, SMALL))
        t["gj"].append(await timed_post(http, gw, SMALL))
        t["ds"].append(await first_event(http, fake, stream_body))
        t["gs"].append(await first_event(http, gw, stream_body))
    rows = []
    for label, d, g in (("response, p50", "dj", "gj"), ("response, p99", "dj", "gj"),
                        ("first SSE event, p50", "ds", "gs"), ("first SSE event, p99", "ds", "gs")):
        p = 99 if "p99" in label else 50
        a, b = percentile(t[d], p), percentile(t[g], p)
        rows.append((label, ms(a), ms(b), f"{(b - a) * 1000:+.2f}"))
    print_table(f"1. small requests, instant fake upstream, {n} of each interleaved (ms)",
                ("", "direct", "gateway", "added"), rows)


async def lag(http, gw: str) -> float:
    async with http.get(gw + "/_bench/lag") as r:
        return (await r.json())["max_ms"]


async def table_bodies(http, fake: str, gw: str) -> None:
    rows = []
    await asyncio.sleep(0.2)
    await lag(http, gw)
    idle_lag = []
    for _ in range(5):
        await asyncio.sleep(0.1)
        idle_lag.append(await lag(http, gw))
    for size in BODY_SIZES:
        data = encode(padded_body(size))
        n = {100_000: 30, 1_000_000: 20, 8_000_000: 6, 30_000_000: 3}[size] // (3 if QUICK else 1)
        await timed_post(http, fake, data)
        await timed_post(http, gw, data)
        d, g, stalls = [], [], []
        for _ in range(n):
            d.append(await timed_post(http, fake, data))
            await lag(http, gw)
            g.append(await timed_post(http, gw, data))
            stalls.append(await lag(http, gw))
        md, mg = statistics.median(d), statistics.median(g)
        rows.append((f"{len(data) / 1e6:.1f} MB (median of {n})", ms(md), ms(mg), f"{(mg - md) * 1000:+.2f}",
                     f"{max(stalls):.1f}"))
    print_table("2. Claude Code main request padded with conversation, billing line dropped, instant fake (ms); "
                f"idle loop lag {max(idle_lag):.1f} ms",
                ("body", "direct", "gateway", "added", "longest loop stall"), rows)


async def table_count_tokens(http, procs: Procs) -> None:
    from orchestrator.ops.supervise import default_model, find_llama_server
    binary = os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or find_llama_server()
    if not binary:
        print("\n3. count_tokens burst: skipped (no llama-server; `make bench` builds one)")
        return
    port = free_port()
    llama = f"http://127.0.0.1:{port}"
    log = open(procs.tmp / "llama.log", "wb")
    p = subprocess.Popen([binary, "--model", default_model(), "--host", "127.0.0.1", "--port", str(port),
                          "--ctx-size", "4096", "--parallel", "1", "--threads", "2", "--no-webui"],
                         stdout=log, stderr=subprocess.STDOUT)
    procs.procs.append(p)
    wait_http(llama + "/health")
    gw, _ = procs.gateway(llama, name="gw-count")
    base = padded_body(1_000_000, seed=7)
    bodies = []
    for i in range(COUNT_BURST):
        b = {k: base[k] for k in ("model", "messages", "system", "tools")}
        b["messages"] = b["messages"][:-1] + [{"role": "user", "content": f"Question {i}: what does mod_{i} do?"}]
        bodies.append(encode(b))

    async def burst(url: str) -> tuple[float, list[int]]:
        async def one(data: bytes) -> int:
            async with http.post(url + "/v1/messages/count_tokens", data=data, headers=JSON_HEADERS) as r:
                return (await r.json())["input_tokens"]
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(b) for b in bodies])
        return time.perf_counter() - t0, counts

    async def sources() -> dict[str, float]:
        async with http.get(gw + "/metrics") as r:
            text = await r.text()
        return {m[0]: float(m[1]) for m in re.findall(r'^orchestrator_count_tokens_total\{source="(\w+)"\} (\S+)$',
                                                     text, re.M)}

    td, direct_counts = await burst(llama)
    tg, gw_counts = await burst(gw)
    first = await sources()
    tr, _ = await burst(gw)
    after = await sources()
    exact = sum(a == b for a, b in zip(direct_counts, gw_counts))
    src = ", ".join(f"{k} {int(v)}" for k, v in first.items() if v)
    rep = ", ".join(f"{k} {int(after[k] - first.get(k, 0))}" for k in after if after[k] - first.get(k, 0))
    rows = [("wall time, first burst (s)", f"{td:.2f}", f"{tg:.2f}", f"{tg / td:.2f}x"),
            ("answers equal to the backend's own", f"{COUNT_BURST}", f"{exact}", f"by source: {src}"),
            ("wall time, the same burst again (s)", f"{td:.2f}", f"{tr:.2f}",
             f"{td / max(tr, 1e-6):.0f}x faster ({rep})")]
    print_table(f"3. {COUNT_BURST} concurrent count_tokens of {len(bodies[0]) / 1e6:.1f} MB each, real llama-server "
                "(SmolLM2) /v1/messages/count_tokens", ("", "direct", "gateway", "ratio"), rows)


async def _queue_depth(http, gw: str, want: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    b = {}
    while time.monotonic() < deadline:
        async with http.get(gw + "/health") as r:
            b = (await r.json())["backends"][0]
        if b["queued"] >= want and b["busy"] >= 1:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"queue never reached {want} in {timeout:g} s: {b.get('queued')} waiting")


async def table_scale(http, procs: Procs, fake: str) -> None:
    data = encode(padded_body(100_000))
    rows = []
    for n in WAITERS:
        gw, proc = procs.gateway(fake, max_depth=max(WAITERS) + 10, max_connections=4 * max(WAITERS),
                                 name=f"gw-wait{n}")
        for _ in range(3):
            await timed_post(http, gw, data)
        direct = [await timed_post(http, fake, data) for _ in range(min(n, 100))]
        async with http.post(fake + "/fake/gate/close"):
            pass
        holder = asyncio.create_task(timed_post(http, gw, data, path="/v1/messages?x_fake_hold=1"))
        await _queue_depth(http, gw, 0)
        await asyncio.sleep(0.3)
        before = rss_kb(proc.pid) / 1024
        waiting = [asyncio.create_task(timed_post(http, gw, data)) for _ in range(n)]
        await _queue_depth(http, gw, n)
        await asyncio.sleep(0.3)
        during = rss_kb(proc.pid) / 1024
        t0 = time.perf_counter()
        async with http.post(fake + "/fake/gate/open"):
            pass
        await holder
        await asyncio.gather(*waiting)
        per = (time.perf_counter() - t0) / n
        dper = statistics.median(direct)
        rows.append((f"{n}", f"{(during - before) * 1024 / n:.0f}", ms(dper), ms(per), f"{(per - dper) * 1000:+.2f}",
                     f"{during:.0f}"))
        procs.stop(proc)
    print_table(f"4. clients waiting on one slot, {len(data) / 1e3:.0f} KB Claude Code body each, instant fake "
                "(a fresh gateway per row)",
                ("waiting", "KiB per waiting request", "direct ms/request", "gateway ms/request (drain)", "added",
                 "gateway RSS MiB"), rows)
    # 200 streams open at once (slots = 200): the real main body, each stream past its first event.
    gw, proc = procs.gateway(fake, slots=OPEN_STREAMS, max_connections=4 * OPEN_STREAMS, name="gw-streams")
    body = encode(main_body())
    idle = rss_kb(proc.pid) / 1024
    async with http.post(fake + "/fake/gate/close"):
        pass
    started = asyncio.Queue()

    async def stream() -> None:
        async with http.post(gw + "/v1/messages?x_fake_hold=1&x_fake_stream=1&x_fake_parts=20", data=body,
                             headers=JSON_HEADERS) as r:
            buf = b""
            while b"message_start" not in buf:
                buf += await r.content.readany()
            started.put_nowait(1)
            await r.read()

    tasks = [asyncio.create_task(stream()) for _ in range(OPEN_STREAMS)]
    for _ in range(OPEN_STREAMS):
        await asyncio.wait_for(started.get(), 120)
    await asyncio.sleep(0.3)
    opened = rss_kb(proc.pid) / 1024
    async with http.post(fake + "/fake/gate/open"):
        pass
    await asyncio.gather(*tasks)
    print(f"  {OPEN_STREAMS} open streams ({len(body) / 1e3:.0f} KB main body each): gateway RSS {opened:.0f} MiB "
          f"(idle {idle:.0f} MiB; goal under 100 MiB)")
    procs.stop(proc)


async def table_throughput(http, fake: str, gw: str, gw_pid: int) -> None:
    title = encode(sample("title-2.1.332.json")["body"])
    seconds = 2.0 if QUICK else 5.0
    rows = []

    async def rate(url: str, path: str, data: bytes | None) -> tuple[float, float]:
        stop = time.perf_counter() + seconds
        done = [0]

        async def client() -> None:
            while time.perf_counter() < stop:
                if data is None:
                    async with http.get(url + path) as r:
                        await r.read()
                else:
                    async with http.post(url + path, data=data, headers=JSON_HEADERS) as r:
                        await r.read()
                done[0] += 1

        c0, t0 = cpu_seconds(gw_pid), time.perf_counter()
        await asyncio.gather(*[client() for _ in range(16)])
        wall = time.perf_counter() - t0
        return done[0] / wall, (cpu_seconds(gw_pid) - c0) / wall

    fake_rate, _ = await rate(fake, "/health", None)
    probe_rate, probe_cpu = await rate(gw, "/api/hello", None)
    syn_rate, syn_cpu = await rate(gw, "/v1/messages", title)
    rows.append(("trivial GET (fake /health; gateway /api/hello)", f"{fake_rate:.0f}", f"{probe_rate:.0f}",
                 f"{probe_cpu * 100:.0f}%", f"{probe_rate / max(probe_cpu, 1e-6):.0f}"))
    rows.append(("synthetic title answer (gateway only)", "-", f"{syn_rate:.0f}", f"{syn_cpu * 100:.0f}%",
                 f"{syn_rate / max(syn_cpu, 1e-6):.0f}"))
    print_table(f"5a. answers per second, 16 clients for {seconds:g} s (the client shares the 2 cores)",
                ("", "direct/s", "gateway/s", "gateway CPU", "gateway per CPU-second"), rows)

    n = 2000 if QUICK else 10000
    body = encode({**json.loads(SMALL), "stream": True})
    res = {"direct": [], "gateway": []}
    for _ in range(3):
        for name, url in (("direct", fake), ("gateway", gw)):
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/messages?x_fake_stream=1&x_fake_parts={n}", data=body, headers=JSON_HEADERS) as r:
                raw = await r.read()
            assert raw.count(b"content_block_delta") >= n, raw[-300:]
            res[name].append(n / (time.perf_counter() - t0))
    d, g = max(res["direct"]), max(res["gateway"])
    print_table(f"5b. SSE relay of a {n}-token answer, one event per write, best of 3 (tokens/s)",
                ("", "direct", "gateway", "ratio"), [("throughput", f"{d:.0f}", f"{g:.0f}", f"{g / d:.2f}x")])


async def main() -> None:
    t0 = time.monotonic()
    # 1,000 waiting clients: a socket each here and in the gateway.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    print(machine())
    print("the gateway's own cost: tables 1, 2, 4, 5 against an instant fake upstream, 3 against llama-server"
          + (" (--quick: short run)" if QUICK else ""))
    with tempfile.TemporaryDirectory() as tmp:
        procs = Procs(Path(tmp))
        try:
            fake = procs.fake()
            gw, gw_proc = procs.gateway(fake)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=600)) as http:
                await table_small(http, fake, gw)
                await table_bodies(http, fake, gw)
                await table_count_tokens(http, procs)
                await table_scale(http, procs, fake)
                await table_throughput(http, fake, gw, gw_proc.pid)
        finally:
            procs.close()
    print(f"\n(bench_overhead run: {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
