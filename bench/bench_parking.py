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
"tool_use" (ToolLoopProxy); everything else is the real server's. Per order: slot switches
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
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from benchlib import machine  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "main-2.1.332.json"
TURNS = 4
MAX_TOKENS = 8
SYSTEM_CHARS = 1500
# Each conversation's own system prompt (an agent's differs from the main one's), tools and task.
ROLES = {
    "main": (None, ("Read", "Edit"), "Read the notes above, then list what the project needs next."),
    "agent1": ("You are an agent for Claude Code. Explore the codebase to answer the question; report findings "
               "concisely.\n\n", ("Read", "Bash"), "Find where the gateway decides which backend serves a request."),
    "agent2": ("You are an agent for Claude Code. Review the change described and report problems; do not edit."
               "\n\n", ("Read", "Write"), "Review the README's crash section for claims the code does not keep."),
}


def notes(index: int, chars: int = 3000) -> str:
    text = (ROOT / "README.md").read_text()
    return text[2000 + index * chars: 2000 + (index + 1) * chars]


class Conversation:
    """One conversation of the session, growing by an exchange a turn."""

    def __init__(self, index: int, name: str) -> None:
        agent_prompt, tools, task = ROLES[name]
        self.name = name
        body = copy.deepcopy(json.loads(FIXTURE.read_text())["body"])
        body["tools"] = [t for t in body["tools"] if t["name"] in tools]
        system = body["system"][2]["text"][:SYSTEM_CHARS]
        if agent_prompt is not None:  # an agent's own system prompt: it parts from main's at its first block
            system = agent_prompt + notes(index + 5, SYSTEM_CHARS)
        body["system"][2]["text"] = system
        first, env = body["messages"][0], body["messages"][1]
        first["content"].insert(1, {"type": "text", "text": f"<system-reminder>\n{notes(index)}\n</system-reminder>\n"})
        first["content"][-1]["text"] = task
        env["content"][0]["text"] = env["content"][0]["text"][:600]
        body["max_tokens"], body["stream"] = MAX_TOKENS, True
        self.body = body
        self.turns = 0

    def next(self, answer: str | None) -> dict:
        if self.turns:
            self.body["messages"] += [
                {"role": "assistant", "content": [{"type": "text", "text": (answer or "").strip() or "Done."}]},
                {"role": "user", "content": [{"type": "text", "text": f"Good. Now do step {self.turns + 1}."}]}]
        self.turns += 1
        self.body["system"][0]["text"] = (f"x-anthropic-billing-header: cc_version=2.1.332.{self.name}"
                                          f"{self.turns:02d}; cc_entrypoint=cli;")
        return copy.deepcopy(self.body)


@dataclass
class Turn:
    label: str
    prompt: int
    cached: int
    ttft: float
    wall: float
    parking: float = 0.0
    reason: str = ""

    @property
    def share(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0


async def send(http, base: str, body: dict) -> tuple[int, int, float, float, str]:
    """(prompt tokens, from cache, ttft, wall, text) of one streamed turn."""
    t0 = time.perf_counter()
    prompt = cached = 0
    ttft = 0.0
    text, event = "", ""
    async with http.post(base + "/v1/messages", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "error":
                    raise AssertionError("stream ended with an error")
            elif line.startswith("data:") and event == "message_start":
                usage = json.loads(line[5:])["message"].get("usage") or {}
                cached = usage.get("cache_read_input_tokens") or 0
                prompt = (usage.get("input_tokens") or 0) + cached
            elif line.startswith("data:") and event == "content_block_delta":
                ttft = ttft or time.perf_counter() - t0
                text += json.loads(line[5:])["delta"].get("text", "")
    return prompt, cached, ttft, time.perf_counter() - t0, text


async def session(http, bases: dict[str, str], apps: dict[str, object], turns: int) -> list[Turn]:
    """main, agent1, agent2, main, ... one at a time; `bases`: the gateway serving each conversation."""
    from orchestrator.backends.gateway import GATEWAY

    convs = [Conversation(i, name) for i, name in enumerate(ROLES)]
    answers: dict[str, str | None] = {c.name: None for c in convs}
    rows = []
    for _ in range(turns):
        for c in convs:
            prompt, cached, ttft, wall, answers[c.name] = await send(http, bases[c.name], c.next(answers[c.name]))
            misses = apps[c.name][GATEWAY].misses
            recent = misses.snapshot("primary")["recent"] if misses else []
            last = recent[-1] if recent else {}
            rows.append(Turn(f"{c.name} {c.turns}", prompt, cached, ttft, wall, last.get("slot_seconds", 0.0),
                             last.get("reason", "")))
    return rows


def gateway_config(url: str, folder: Path | None, park: bool, prefer: bool = True) -> dict:
    backend = {"name": "primary", "url": url, "slots": 1}
    if folder is not None:
        backend |= {"kv_save_dir": str(folder), "kv_park": park, "kv_save_idle_seconds": 3600}
    else:
        backend |= {"kv_save": False}
    return {"backends": [backend], "gateway": {"health_interval_seconds": 0.5},
            "queue": {} if prefer else {"cache_preference_max_passes": 0, "cache_preference_keep_seconds": 0}}


@dataclass
class Loops:
    """The three conversations as tool loops at once on one slot."""

    rows: list[Turn]
    seconds: float    # the whole run
    switches: int     # turns whose slot held another conversation (unparked, switched or evicted)
    preferred: int    # slots given out of arrival order for the cache (slots.py)


class ToolLoopProxy:
    """Between the gateway and the real llama-server, everything passed through as it is, except that an
    answer's `stop_reason` "max_tokens" is given as "tool_use": SmolLM2 cannot call a tool, and a tool
    loop is what these turns stand for (the client sends the next turn once the tool ran). Time, cache
    and slot work all stay the real server's."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    def app(self):
        from aiohttp import web

        async def relay(request: web.Request) -> web.StreamResponse:
            try:
                return await passed_on(request)
            except aiohttp.ClientConnectorError as e:
                # The server is not up yet (the gateway's first health checks): what a dead server gives.
                return web.Response(status=502, text=f"relay: {e}")

        async def passed_on(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            async with aiohttp.ClientSession() as http, \
                    http.request(request.method, self.upstream + request.path_qs, data=body,
                                 headers={k: v for k, v in request.headers.items()
                                          if k.lower() in ("content-type", "accept")}) as r:
                out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get(
                    "Content-Type", "application/octet-stream")})
                await out.prepare(request)
                async for line in r.content:
                    if line.startswith(b"data:") and b'"stop_reason":"max_tokens"' in line:
                        line = line.replace(b'"stop_reason":"max_tokens"', b'"stop_reason":"tool_use"')
                    await out.write(line)
                await out.write_eof()
                return out

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", relay)
        return app


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


class Bench:
    """Real llama-servers and in-process gateways, all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers = []
        self.runners = []

    def server(self, *extra: str, slots_folder: Path | None = None):
        from conftest import LlamaServer

        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        args = ("--slot-save-path", str(slots_folder)) if slots_folder else ()
        s = LlamaServer(folder, (*args, *extra))
        self.servers.append(s)
        s.start()
        return s

    async def gateway(self, raw: dict):
        from prometheus_client import CollectorRegistry

        from orchestrator.configfile import config_from_dict
        from orchestrator.http.app import create_app, start

        app = create_app(config_from_dict(raw), CollectorRegistry())
        runner = await start(app, "127.0.0.1", 0)
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}", app

    async def one_server(self, http, turns: int, park: bool, *extra: str) -> list[Turn]:
        slots = Path(tempfile.mkdtemp(dir=self.tmp))
        s = self.server(*extra, slots_folder=slots)
        try:
            base, app = await self.gateway(gateway_config(s.url, slots, park))
            return await session(http, {n: base for n in ROLES}, {n: app for n in ROLES}, turns)
        finally:
            s.stop()

    async def loops(self, http, turns: int, prefer: bool, *extra: str, session_first: bool = False) -> Loops:
        from aiohttp import web

        slots = Path(tempfile.mkdtemp(dir=self.tmp))
        s = self.server(*extra, slots_folder=slots)
        runner = web.AppRunner(ToolLoopProxy(s.url).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        try:
            host, port = runner.addresses[0][:2]
            base, app = await self.gateway(gateway_config(f"http://{host}:{port}", slots, True, prefer))
            if session_first:
                rank_session_first(app)
            return await loops(http, base, app, turns)
        finally:
            s.stop()

    async def own_servers(self, http, turns: int, *extra: str) -> list[Turn]:
        servers = {n: self.server(*extra) for n in ROLES}
        try:
            gws = {n: await self.gateway(gateway_config(s.url, None, False)) for n, s in servers.items()}
            return await session(http, {n: g[0] for n, g in gws.items()}, {n: g[1] for n, g in gws.items()}, turns)
        finally:
            for s in servers.values():
                s.stop()

    async def close(self) -> None:
        for r in reversed(self.runners):
            await r.cleanup()
        for s in self.servers:
            s.stop()


def later_turns(rows: list[Turn]) -> list[Turn]:
    return [r for r in rows if not r.label.endswith(" 1")]


def total(rows: list[Turn]) -> float:
    return sum(r.wall for r in rows)


def table(columns: dict[str, list[Turn]]) -> list[str]:
    names = list(columns)
    out = ["| turn | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, row in enumerate(columns[names[0]]):
        cells = []
        for n in names:
            r = columns[n][i]
            park = f", park {r.parking * 1000:.0f} ms" if r.parking else ""
            why = f" {r.reason}" if r.reason else ""
            cells.append(f"{r.cached}/{r.prompt} ({r.share:.0%}){why}, ttft {r.ttft:.2f} s{park}")
        out.append(f"| {row.label} | " + " | ".join(cells) + " |")
    sums = []
    for n in names:
        later = later_turns(columns[n])
        low = min((r.share for r in later), default=0.0)
        sums.append(f"later turns >= {low:.0%} from cache; all {total(columns[n]):.1f} s "
                    f"({total(columns[n]) / total(columns['own']):.2f}x own)" if "own" in columns else "")
    out.append("| whole sequence | " + " | ".join(sums) + " |")
    return out


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
                             await bench.loops(http, turns, True, "--cache-ram", "0"),
                             "arrival order": await bench.loops(http, turns, False, "--cache-ram", "0"),
                             "the session before its agents": await bench.loops(http, turns, True, "--cache-ram", "0",
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
