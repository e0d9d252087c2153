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
import copy
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import free_port, machine, wait_http  # noqa: E402

from orchestrator import sse  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
QUICK = "--quick" in sys.argv
MiB = 1024 * 1024
# Padded body sizes of table 2; the last is just under gateway.max_body_bytes (32 MiB).
BODY_SIZES = (100_000, 1_000_000, 8_000_000) if QUICK else (100_000, 1_000_000, 8_000_000, 30_000_000)
WAITERS = (1, 10, 100) if QUICK else (1, 10, 100, 1000)
OPEN_STREAMS = 200
COUNT_BURST = 25


# ---- helpers -----------------------------------------------------------------------------------





def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]




def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))).rstrip())


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


# ---- request bodies ----------------------------------------------------------------------------

def main_body() -> dict:
    """Claude Code 2.1.332's real main request, billing line first, as it sends it."""
    body = copy.deepcopy(json.loads((FIXTURES / "main-2.1.332.json").read_text())["body"])
    body["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.332.7a0; cc_entrypoint=cli; cch=4f2a1;"
    return body


def encode(body: dict) -> bytes:
    # As Claude Code (JSON.stringify) sends it: compact, non-ASCII as UTF-8.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _turn(rng: random.Random, i: int) -> list[dict]:
    """One tool round trip of a coding session: a tool call, a file's text back, a short reply."""
    lines = []
    for n in range(rng.randint(120, 260)):
        indent = " " * rng.choice((0, 4, 8, 12))
        lines.append(f'{indent}value_{n} = compute("{rng.random():.6f}", path=r"C:\\src\\mod_{i}.py")  '
                     f"# état {n}: \"quoted\" — ok ✓")
    call_id = f"toolu_{i:08d}{rng.randrange(16 ** 8):08x}"
    return [
        {"role": "assistant", "content": [
            {"type": "text", "text": f"Let me read module {i} to see how it computes its values."},
            {"type": "tool_use", "id": call_id, "name": "Read", "input": {"file_path": f"/repo/src/mod_{i}.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id, "content": "\n".join(lines)}]},
    ]


def padded_body(size: int, *, seed: int = 1) -> dict:
    """The real main request with tool round trips inserted before its last message, to about `size` bytes."""
    body = main_body()
    body["stream"] = False
    rng = random.Random(seed)
    base = len(encode(body))
    turns: list[dict] = []
    grown = base
    i = 0
    while grown < size:
        t = _turn(rng, i)
        grown += len(encode(t)) + 1
        turns += t
        i += 1
    body["messages"] = body["messages"][:-1] + turns + body["messages"][-1:]
    return body


# ---- the instant fake upstream (own process) ---------------------------------------------------

def _fake_events(n_deltas: int) -> list[bytes]:
    msg = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "fake.gguf", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 0}}
    out = [sse.encode("message_start", {"type": "message_start", "message": msg}),
           sse.encode("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})]
    delta = sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": " token"}})
    out += [delta] * n_deltas
    out += [sse.encode("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse.encode("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                            "stop_sequence": None},
                                         "usage": {"output_tokens": n_deltas}}),
            sse.encode("message_stop", {"type": "message_stop"})]
    return out


ANSWER = json.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "fake.gguf",
                     "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
                     "usage": {"input_tokens": 10, "output_tokens": 1}}).encode()


def run_fake(port: int) -> None:
    """Answers at once; `?bench_stream=N` streams N deltas, one write each (as llama-server writes
    tokens); `?bench_hold=1` waits for POST /_gate/open (holds a slot, keeps streams open). In the
    query, which the gateway passes on as it came (it forwards only the headers a backend needs)."""
    gate = asyncio.Event()
    gate.set()

    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        hold = "bench_hold" in request.query
        n = request.query.get("bench_stream")
        if n is None:
            if hold:
                await gate.wait()
            return web.Response(body=ANSWER, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = _fake_events(int(n))
        await resp.write(events[0])
        if hold:
            await gate.wait()
        for ev in events[1:]:
            await resp.write(ev)
        await resp.write_eof()
        return resp

    async def gate_ctl(request: web.Request) -> web.Response:
        (gate.set if request.match_info["op"] == "open" else gate.clear)()
        return web.Response(text="ok")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def slots(request: web.Request) -> web.Response:
        return web.json_response([{"id": 0, "is_processing": False}])

    app = web.Application(client_max_size=100 * MiB)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/_gate/{op}", gate_ctl)
    app.router.add_get("/health", health)
    app.router.add_get("/slots", slots)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---- the gateway with a loop-lag probe (own process) -------------------------------------------

def run_gateway(config_path: str, port: int) -> None:
    """The gateway as `orchestrator serve --config` runs it, plus GET /_bench/lag: the longest the
    event loop was kept from running a 1 ms timer since the last read (ms)."""
    from orchestrator.configfile import load_config, with_overrides
    from orchestrator.http.app import create_app, start

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
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def fake(self) -> str:
        port = free_port()
        self.spawn("--_fake", str(port), log="fake.log")
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
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.stop(p)


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
    async with http.post(url + "/v1/messages?bench_stream=3", data=data, headers=JSON_HEADERS) as r:
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
        a, b = pct(t[d], p), pct(t[g], p)
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
    sys.path.insert(0, str(ROOT / "bench"))
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
        async with http.post(fake + "/_gate/close"):
            pass
        holder = asyncio.create_task(timed_post(http, gw, data, path="/v1/messages?bench_hold=1"))
        await _queue_depth(http, gw, 0)
        await asyncio.sleep(0.3)
        before = rss_mib(proc.pid)
        waiting = [asyncio.create_task(timed_post(http, gw, data)) for _ in range(n)]
        await _queue_depth(http, gw, n)
        await asyncio.sleep(0.3)
        during = rss_mib(proc.pid)
        t0 = time.perf_counter()
        async with http.post(fake + "/_gate/open"):
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
    idle = rss_mib(proc.pid)
    async with http.post(fake + "/_gate/close"):
        pass
    started = asyncio.Queue()

    async def stream() -> None:
        async with http.post(gw + "/v1/messages?bench_hold=1&bench_stream=20", data=body,
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
    opened = rss_mib(proc.pid)
    async with http.post(fake + "/_gate/open"):
        pass
    await asyncio.gather(*tasks)
    print(f"  {OPEN_STREAMS} open streams ({len(body) / 1e3:.0f} KB main body each): gateway RSS {opened:.0f} MiB "
          f"(idle {idle:.0f} MiB; goal under 100 MiB)")
    procs.stop(proc)


async def table_throughput(http, fake: str, gw: str, gw_pid: int) -> None:
    title = encode(json.loads((FIXTURES / "title-2.1.332.json").read_text())["body"])
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
            async with http.post(f"{url}/v1/messages?bench_stream={n}", data=body, headers=JSON_HEADERS) as r:
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
    if sys.argv[1:2] == ["--_fake"]:
        run_fake(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--_gateway"]:
        run_gateway(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
