"""A bounded soak: simulated Claude Code clients against the real supervised stack while
llama-server segfaults now and then.

Several clients loop over real request shapes (main turns streamed and not, count_tokens,
titles, topic checks, warm-ups, count probes), abandon some requests at a random moment,
and a chaos task sends SIGSEGV to the supervised llama-server a few times. Every request
the clients sent must end as exactly one of: a complete answer, an Anthropic-shaped error,
or a disconnect the client itself caused. Afterwards no slot is busy, nothing is queued,
the gateway's counters agree with what the clients saw, every crash was counted, the
gateway never restarted and its memory stayed flat.

Runs about 2 minutes 10 s (120 s of traffic); ORCHESTRATOR_SOAK_SECONDS and ORCHESTRATOR_SOAK_SEED
change it. The seed is printed with the summary (`-s`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from orchestrator.configfile import load_config
from testkit.soak import REQUEST_BOUND, Shapes, give_up_after, send
from testkit.stack import down_leaving_nothing, Stack, wait_health

SOAK_SECONDS = float(os.environ.get("ORCHESTRATOR_SOAK_SECONDS", "120"))  # traffic, warm-up included
WARMUP_SECONDS = 15.0        # traffic before the memory baseline and the first kill
CLIENTS = 5
KILLS = 4
MAX_RSS_GROWTH_KB = 30 * 1024
MAX_OUTPUT_TOKENS = 48

# How each kind of request is routed, i.e. the `route` label the gateway counts it under.
ROUTE = {"main": "main", "main_json": "main", "count_tokens": "count_tokens", "title": "synthetic",
         "title_json": "synthetic", "topic": "synthetic", "topic_json": "synthetic", "warmup": "synthetic",
         "probe": "synthetic"}


# ---- the stack ----------------------------------------------------------------------------------

def _write_config(s: Stack) -> None:
    """Stack's own TOML, with the soak's limits: a short output cap, a deep queue, a long grace, a
    queue wait that ends (529) before a client's REQUEST_BOUND. One thread: on a 2-core machine
    shared with other test runs, llama.cpp's threads wait on each other and two are slower than one."""
    s.config_path.write_text(f"""
[gateway]
port = {s.gw_port}
health_interval_seconds = 0.5
[queue]
max_depth = 256
max_wait_seconds = 100
down_grace_seconds = 600
[[backends]]
name = "primary"
url = "http://127.0.0.1:{s.llama_port}"
command = "{{llama_server}} --model {{default_model}} --host {{host}} --port {{port}} --parallel 1 --ctx-size 8192 --metrics --threads 1 --no-webui"
start_seconds = 1
start_retries = 3
max_output_tokens = {MAX_OUTPUT_TOKENS}
""")
    s.config = load_config(s.config_path)


@pytest.fixture
def soak_stack(tmp_path):
    root = tmp_path / "stack"
    root.mkdir()
    s = Stack(root)
    _write_config(s)
    yield s
    down_leaving_nothing(s)


# ---- the simulated sessions, and the chaos --------------------------------------------------------

# What a client does next: (weight, the requests it fires together). A turn is a main call with,
# like Claude Code, a topic check or a title alongside; /context fires a burst of count_tokens.
ACTIONS = [
    (30, ("main",)),
    (12, ("main", "topic")),
    (6, ("main", "title")),
    (8, ("main_json",)),
    (10, ("count_tokens",) * 4),
    (6, ("count_tokens",)),
    (5, ("warmup",)),
    (5, ("probe",)),
    (4, ("title_json",)),
    (4, ("topic_json",)),
    (4, ("title",)),
]


async def client(url: str, shapes: Shapes, rng: random.Random, stop_at: float, results: list) -> None:
    history: list = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        while time.monotonic() < stop_at:
            kinds = rng.choices([a for _, a in ACTIONS], weights=[w for w, _ in ACTIONS])[0]
            reqs = [shapes.make(k, rng, history) for k in kinds]
            for r in reqs:
                r.abort_after = give_up_after(rng)
            done = await asyncio.gather(*[send(session, url, r) for r in reqs])
            results.extend(done)
            main = next(((q, d) for q, d in zip(reqs, done) if q.kind in ("main", "main_json")), None)
            # A session grows by its turns, then starts over (bounded context).
            if main and main[1].outcome == "complete" and len(history) < 4:
                history = main[0].body["messages"] + [{"role": "assistant", "content": [
                    {"type": "text", "text": "Done."}]}]
            elif main and (len(history) >= 4 or rng.random() < 0.2):
                history = []
            await asyncio.sleep(rng.uniform(0.0, 0.3))


async def _backend(http, url) -> dict:
    return (await wait_health(http, url))["backends"][0]


async def _generating(http, s: Stack) -> str:
    """'mid-answer (n tokens)' when llama-server's slot is generating, else 'any time'."""
    try:
        async with http.get(f"http://127.0.0.1:{s.llama_port}/slots") as r:
            slots = await r.json() if r.status == 200 else []
    except aiohttp.ClientError:
        return "any time"
    for slot in slots if isinstance(slots, list) else []:
        n = ((slot.get("next_token") or [{}])[0]).get("n_decoded", 0)
        if slot.get("is_processing") and n >= 1:
            return f"mid-answer ({n} tokens)"
    return "any time"


async def chaos(s: Stack, http, rng: random.Random, t0: float, first_at: float, last_at: float,
                kills: list, restarts_seen: list, main_done) -> None:
    """SIGSEGV the supervised llama-server up to KILLS times at random moments in [first_at, last_at].
    Before the next kill: the gateway has seen the restart, and the new process has answered a main
    request or had 20 s to (a crash loop would test little but the retry limit on a slow machine)."""
    next_at = first_at + rng.uniform(0.0, 3.0)
    while len(kills) < KILLS:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if time.monotonic() > last_at:
            return
        # Every other kill waits (a bounded while) for the slot to be generating, so some land
        # mid-answer, after the client got bytes; the others land wherever they land.
        moment = "any time"
        if len(kills) % 2 == 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(1.0, min(20.0, last_at + 5 - time.monotonic()))):
                    while (moment := await _generating(http, s)) == "any time":
                        await asyncio.sleep(0.05)
        pid = await asyncio.to_thread(s.pid, "llama-primary")
        at = await _backend(http, s.url)
        os.kill(pid, signal.SIGSEGV)
        t_kill = time.monotonic()
        kills.append(pid)
        # Back: a new process, ready, and its restart seen (counted exactly once: checked at the end).
        deadline = time.monotonic() + 60
        while True:
            b = await _backend(http, s.url)
            new = await asyncio.to_thread(s.pid, "llama-primary")
            if new and new != pid and b["state"] == "ready" and b["restarts"] >= len(kills):
                break
            assert time.monotonic() < deadline, f"llama-server not back 60 s after kill {len(kills)}: {b}"
            await asyncio.sleep(0.2)
        t_ready = time.monotonic()
        restarts_seen.append(b["restarts"])
        done = main_done()
        try:
            async with asyncio.timeout(20):
                while main_done() == done:
                    await asyncio.sleep(0.2)
        except TimeoutError:
            pass
        print(f"  kill {len(kills)} at {t_kill - t0:5.1f}s, {moment} (busy {at['busy']}, queued {at['queued']}): "
              f"pid {pid} -> {new}, ready after {t_ready - t_kill:.1f}s, answering after "
              f"{time.monotonic() - t_kill:.1f}s; gateway's restart count {b['restarts']}", flush=True)
        next_at = time.monotonic() + rng.uniform(2.0, 10.0)


def _rss_kb(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m, f"no VmRSS for pid {pid}"
    return int(m.group(1))


async def _series(http, url: str, name: str) -> dict[tuple, float]:
    """Every sample of one metric: {sorted label pairs: value}."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
        out[labels] = float(m.group(2))
    return out


def _by(series: dict[tuple, float], *keys: str) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for labels, v in series.items():
        d = dict(labels)
        c[tuple(d[k] for k in keys)] += v
    return c


# ---- the soak -----------------------------------------------------------------------------------

@pytest.mark.real
async def test_soak_clients_abandon_and_llama_server_segfaults(soak_stack, http):
    s = soak_stack
    seed = int(os.environ.get("ORCHESTRATOR_SOAK_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    t_begin = time.monotonic()
    assert s.up() == "started"
    async with asyncio.timeout(60):
        while (await _backend(http, s.url))["state"] != "ready":
            await asyncio.sleep(0.2)
    gw_pid = s.pid("gateway")
    requests_before = await _series(http, s.url, "orchestrator_requests_total")
    restarts_before = await s.metric(http, "orchestrator_backend_restarts_total")
    assert restarts_before == 0

    shapes, results, kills, restarts_seen = Shapes(), [], [], []
    t0 = time.monotonic()
    stop_at = t0 + SOAK_SECONDS
    clients = [asyncio.create_task(client(s.url, shapes, random.Random(rng.random()), stop_at, results))
               for _ in range(CLIENTS)]
    await asyncio.sleep(WARMUP_SECONDS)
    rss_warm = _rss_kb(gw_pid)
    main_done = lambda: sum(r.kind in ("main", "main_json") and r.outcome == "complete" for r in results)  # noqa: E731
    chaos_task = asyncio.create_task(chaos(s, http, random.Random(rng.random()), t0, time.monotonic(),
                                           stop_at - 10, kills, restarts_seen, main_done))
    # Every loop is bounded: clients stop sending at stop_at, and no request outlives REQUEST_BOUND.
    async with asyncio.timeout(SOAK_SECONDS + REQUEST_BOUND + 30):
        await asyncio.gather(*clients)
        await chaos_task
    t_traffic = time.monotonic() - t0

    # Let abandoned requests' slots be released, then look. The slot is idle when it is free twice,
    # the second time past kv_save_idle_seconds (2 s): the idle save of the last turn holds the slot
    # a moment then (a snapshot taken just 2 s after the slot was first seen free once caught it).
    settle_start = time.monotonic()
    b = await _backend(http, s.url)
    while time.monotonic() - settle_start < 20:
        if not (b["busy"] or b["queued"]):
            await asyncio.sleep(3)
            b = await _backend(http, s.url)
            if not (b["busy"] or b["queued"]):
                break
        await asyncio.sleep(0.5)
        b = await _backend(http, s.url)
    rss_end = _rss_kb(gw_pid)
    # llama-server's own view: no generation left running for an abandoned request.
    async with http.get(f"http://127.0.0.1:{s.llama_port}/slots") as r:
        slots = await r.json() if r.status == 200 else None
    processing = sum(1 for x in slots if x.get("is_processing")) if isinstance(slots, list) else "?"
    requests_after = await _series(http, s.url, "orchestrator_requests_total")
    disconnects = sum((await _series(http, s.url, "orchestrator_client_disconnects_total")).values())
    restarts = await s.metric(http, "orchestrator_backend_restarts_total")
    gw_log = s.paths.log("gateway").read_text(errors="replace")

    # ---- summary ----
    by_outcome = collections.Counter(r.outcome for r in results)
    by_kind = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r.kind][r.outcome] += 1
    errors = collections.Counter((r.gateway_status, r.error_type) for r in results if r.outcome == "error")
    counted = _by({k: v - requests_before.get(k, 0.0) for k, v in requests_after.items()}, "route", "status")
    print(f"\nsoak seed {seed}: {len(results)} requests in {t_traffic:.0f}s of traffic from {CLIENTS} clients "
          f"({time.monotonic() - t_begin:.0f}s in all)")
    print(f"  outcomes: {dict(by_outcome)}")
    for kind in sorted(by_kind):
        print(f"    {kind:13} {dict(by_kind[kind])}")
    print(f"  errors seen: {dict(errors)}")
    print(f"  gateway counted: {dict(sorted((f'{r}/{st}', int(v)) for (r, st), v in counted.items() if v))}")
    print(f"  client disconnects counted {int(disconnects)}; kills {len(kills)}, restarts counted {int(restarts)}")
    print(f"  after: busy {b['busy']}, queued {b['queued']}, state {b['state']}; "
          f"llama-server slots processing: {processing}")
    print(f"  gateway RSS: {rss_warm / 1024:.1f} MB after warm-up, {rss_end / 1024:.1f} MB at the end "
          f"({(rss_end - rss_warm) / 1024:+.1f} MB)")
    print(f"  logs: {s.paths.log_dir}")

    # Every invariant is checked, and all that fail are told together.
    problems: list[str] = []

    def check(ok: bool, message) -> None:
        if not ok:
            problems.append(message() if callable(message) else str(message))

    # ---- every request ended as exactly one acceptable outcome ----
    bad = [r for r in results if r.outcome not in ("complete", "error", "aborted")]
    check(not bad, lambda: f"{len(bad)} requests ended otherwise:\n" + "\n".join(
        f"    {r.kind} {r.outcome} after {r.seconds:.1f}s (abort at {r.abort_after}): {r.detail}" for r in bad[:20]))
    # The soak did what it says: traffic of every kind, answers, aborts, crashes.
    # (Modest figures: on a busy 2-core machine SmolLM2 generates a few tokens a second.)
    check(by_outcome["complete"] >= 30 and by_outcome["aborted"] >= 3, f"too little traffic: {dict(by_outcome)}")
    check(by_kind["main"]["complete"] + by_kind["main_json"]["complete"] >= 5,
          f"too few main answers: {dict(by_kind['main'])} {dict(by_kind['main_json'])}")
    check(len(kills) >= KILLS - 1, f"only {len(kills)} kills")

    # ---- nothing left behind ----
    check(b["busy"] == 0 and b["queued"] == 0, f"slots busy or requests queued after the soak: {b}")
    check(b["state"] == "ready", f"backend not ready after the soak: {b}")
    check(processing in (0, "?"), f"llama-server still processing after the soak: {slots}")

    # ---- the gateway's count agrees with the clients' ----
    # A request is counted once its handler ends: every answer the clients received was counted
    # under its status, and the gateway counted nothing that was neither answered nor abandoned
    # (a request abandoned before its handler counted it may be missing; one abandoned after its
    # answer was made is counted under that answer's status).
    seen = collections.Counter((ROUTE[r.kind], r.gateway_status) for r in results
                               if r.outcome in ("complete", "error"))
    aborted = collections.Counter(ROUTE[r.kind] for r in results if r.outcome == "aborted")
    for key, n in seen.items():
        check(counted[key] >= n, f"{key}: clients received {n} answers, the gateway counted {counted[key]}")
    for route in set(ROUTE.values()):
        answered = sum(n for (rt, _), n in seen.items() if rt == route)
        total = sum(v for (rt, _), v in counted.items() if rt == route)
        gone = counted[(route, "client_gone")]
        check(answered + gone <= total <= answered + aborted[route],
              f"route {route}: {answered} answered + {aborted[route]} abandoned by the clients, "
              f"gateway counted {total} ({gone} client_gone)")
    check(disconnects <= sum(aborted.values()),
          f"{disconnects} client disconnects counted, clients abandoned {sum(aborted.values())}")

    # ---- every crash counted once; the gateway itself never crashed, nor leaked ----
    check(restarts == len(kills) and b["restarts"] == len(kills),
          f"{len(kills)} kills, but orchestrator_backend_restarts_total is {restarts:g} and /health says "
          f"{b['restarts']} (the gateway's count after each kill: {restarts_seen}); see {s.paths.log('gateway')}")
    check(s.pid("gateway") == gw_pid, "the gateway restarted")
    check("Traceback" not in gw_log, lambda: "a traceback in the gateway's log:\n"
          + gw_log[max(0, gw_log.find("Traceback") - 1500):][:5000])
    check(rss_end - rss_warm < MAX_RSS_GROWTH_KB, f"gateway RSS grew {rss_warm} -> {rss_end} kB")
    assert not problems, "\n".join(["the soak found:", *(f"  - {p}" for p in problems)])
