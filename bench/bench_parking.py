"""Three conversations on one single-slot llama-server, parked and unparked (issue 19).

    make bench        (or: .venv/bin/python bench/bench_parking.py [--turns N])

A Claude Code session with two background agents: a main conversation and two agents, each with its
own system prompt, tools and first message, built from Claude Code's real main request
(tests/fixtures/main-2.1.332.json, trimmed so a cold prefill takes seconds), interleaved on one
real llama-server (SmolLM2-135M, --parallel 1): main turn 1, agent 1 turn 1, agent 2 turn 1, main
turn 2, ... one request at a time, streamed, a new billing line on every request. Each turn appends
the model's real answer and a new question. Side by side in one run:

  parked     one server, --cache-ram 0, the gateway parking and unparking (kv_park, the default)
  unparked   the same without parking (kv_park = false): what the gateway did before issue 19
  parked+ram one server, llama-server's default host-memory prompt cache (8 GiB), parking on
  own        three servers, each conversation on its own: the time the sequence should take

Then the queue's order (slots.py): the three as tool loops at once, each sending its next turn as soon
as its last one ended, so they contend for the slot; with the default preference for the conversation
the slot holds (queue.cache_preference_max_passes, the slot kept for a tool loop's next turn) and in
arrival order. SmolLM2 cannot call tools: a pass-through gives its answers' "max_tokens" stop as
"tool_use" (as_tool_use, in testkit.proxy.Proxy); everything else is the real server's. Per order: slot switches
(each a park and an unpark), the whole run, the mean turn of the session and of its agents, and the
longest turn (waits included: the fairness cost). A third order, which the gateway does not take, is
measured beside them: the session's turns before its agents' (rank_session_first).

Per turn: prompt tokens read from cache (usage.cache_read_input_tokens), time to first token at the
client, and the time the gateway spent parking, checkpointing and unparking before the send (what
cachemiss.py records), with its reason. Figures on a shared machine are noisy: compare the columns
of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from testkit.bench import machine
from testkit.parking_session import ROLES, TURNS, Bench, Conversation, Turn, gateway_config, later_turns, send, table
from testkit.proxy import Proxy


@dataclass
class Loops:
    """The three conversations as tool loops at once on one slot."""

    rows: list[Turn]
    seconds: float    # the whole run
    switches: int     # turns whose slot held another conversation (unparked, switched or evicted)
    preferred: int    # slots given out of arrival order for the cache (slots.py)


def as_tool_use(line: bytes) -> bytes:
    """An answer's `stop_reason` "max_tokens" given as "tool_use": SmolLM2 cannot call a tool, and a
    tool loop is what these turns stand for (the client sends the next turn once the tool ran). Time,
    cache and slot work all stay the real server's."""
    if line.startswith(b"data:"):
        return line.replace(b'"stop_reason":"max_tokens"', b'"stop_reason":"tool_use"')
    return line


async def loops(http, base: str, app, turns: int) -> Loops:
    """Each conversation sends its next turn as soon as its last one ended (a tool loop with instant
    tools): they contend for the slot, and the queue's order decides how often the slot switches."""
    from orchestrator.backends.gateway import GATEWAY

    gw = app[GATEWAY]
    rows: list[Turn] = []

    async def loop(c: Conversation) -> None:
        answer = None
        for _ in range(turns):
            prompt, cached, ttft, wall, answer = await send(http, base, c.next(answer))
            rows.append(Turn(f"{c.name} {c.turns}", prompt, cached, ttft, wall))

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(Conversation(i, name)) for i, name in enumerate(ROLES)))
    seconds = time.perf_counter() - t0
    reasons = gw.misses.snapshot("primary")["turns"]
    preferred = gw.metrics.registry.get_sample_value("orchestrator_cache_preferred_grants_total",
                                                     {"backend": "primary"}) or 0
    return Loops(rows, seconds, sum(reasons.get(r, 0) for r in ("unparked", "switched", "evicted")), int(preferred))


def rank_session_first(app) -> None:
    """The order the gateway does not take, measured beside it: the session's turns before its agents'
    (the agents' requests queued one class lower), the preference for the slot's conversation kept
    within each class. Done here, on the bench's own gateway, by wrapping its queue's acquire."""
    from orchestrator.backends.gateway import GATEWAY
    from orchestrator.conversation import conversation_key
    from orchestrator.slots import Priority

    session = conversation_key(Conversation(0, "main").next(None))
    queue = app[GATEWAY].backends["primary"].queue
    acquire = queue.acquire

    async def ranked(priority=Priority.MAIN, *, tag=None, **kw):
        if priority == Priority.MAIN and tag is not None and tag() != session:
            priority = Priority.BACKGROUND
        return await acquire(priority, tag=tag, **kw)

    queue.acquire = ranked


async def tool_loops(bench: Bench, http, turns: int, prefer: bool, *extra: str, session_first: bool = False) -> Loops:
    """The three as tool loops on one parked server, behind a pass-through giving their stops as tool calls."""
    from aiohttp import web

    slots = Path(tempfile.mkdtemp(dir=bench.tmp))
    s = bench.server(*extra, slots_folder=slots)
    runner = web.AppRunner(Proxy(s.url, rewrite=as_tool_use).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bench.runners.append(runner)
    try:
        host, port = runner.addresses[0][:2]
        base, app = await bench.gateway(gateway_config(f"http://{host}:{port}", slots, True, prefer))
        if session_first:
            rank_session_first(app)
        return await loops(http, base, app, turns)
    finally:
        s.stop()


def loops_table(runs: dict[str, Loops]) -> list[str]:
    out = ["| order | whole run | slot switches | given out of order | session's turns, mean | agents' turns, mean "
           "| longest turn | later turns from cache |", "|---|---|---|---|---|---|---|---|"]

    def mean(rows: list[Turn]) -> float:
        return statistics.mean(t.wall for t in rows) if rows else 0.0

    for name, r in runs.items():
        later = later_turns(r.rows)
        session = [t for t in r.rows if t.label.startswith("main ")]
        agents = [t for t in r.rows if not t.label.startswith("main ")]
        out.append(f"| {name} | {r.seconds:.1f} s | {r.switches} of {len(r.rows)} turns | {r.preferred} "
                   f"| {mean(session):.1f} s | {mean(agents):.1f} s | {max(t.wall for t in r.rows):.1f} s "
                   f"| >= {min((t.share for t in later), default=0):.0%} |")
    return out


async def run(turns: int, loops_only: bool = False) -> tuple[dict[str, list[Turn]], dict[str, Loops]]:
    with tempfile.TemporaryDirectory(prefix="bench-parking-") as tmp:
        bench = Bench(Path(tmp))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
                columns = {} if loops_only else {
                    "parked": await bench.one_server(http, turns, True, "--cache-ram", "0"),
                    "own": await bench.own_servers(http, turns, "--cache-ram", "0"),
                    "unparked": await bench.one_server(http, turns, False, "--cache-ram", "0"),
                    "parked+ram": await bench.one_server(http, turns, True)}
                contended = {"the slot's conversation first (default)":
                             await tool_loops(bench, http, turns, True, "--cache-ram", "0"),
                             "arrival order": await tool_loops(bench, http, turns, False, "--cache-ram", "0"),
                             "the session before its agents": await tool_loops(bench, http, turns, True, "--cache-ram", "0",
                                                                                 session_first=True)}
                return columns, contended
        finally:
            await bench.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--loops-only", action="store_true", help="only the queue's order")
    args = parser.parse_args()
    print(machine())
    t0 = time.monotonic()
    columns, contended = asyncio.run(run(args.turns, args.loops_only))
    if columns:
        print("\nA main conversation and two agents interleaved on one single-slot llama-server (SmolLM2-135M): "
              "prompt tokens from cache, reason, time to first token, parking time")
        print("\n".join(table(columns)))
    print("\nThe same three as tool loops at once (each turn sent as its last one ends), parked, --cache-ram 0: "
          "the queue's order")
    print("\n".join(loops_table(contended)))
    print(f"\n(bench took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
