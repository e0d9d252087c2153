"""Three conversations of one Claude Code session on one single-slot llama-server (issue 19): a main
conversation and two agents, each with its own system prompt, tools and first message, built from
Claude Code's real main request (tests/fixtures/main-2.1.332.json, trimmed so a cold prefill takes
seconds), interleaved one request at a time, streamed, a new billing line on every request. Each turn
appends the model's real answer and a new question. Run by bench/bench_parking.py and
tests/real/test_real_parking.py."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .bodies import GrowingConversation, notes, trimmed_turn
from .client import sample
from .servers import LlamaServer

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


class Conversation(GrowingConversation):
    """One conversation of the session, growing by an exchange a turn."""

    def __init__(self, index: int, name: str) -> None:
        agent_prompt, tools, task = ROLES[name]
        self.name = name
        system = sample("main-2.1.332.json")["body"]["system"][2]["text"][:SYSTEM_CHARS]
        if agent_prompt is not None:  # an agent's own system prompt: it parts from main's at its first block
            system = agent_prompt + notes(index + 5, SYSTEM_CHARS)
        body = trimmed_turn(tools, system, notes(index), task, MAX_TOKENS)
        self.body = body
        self.turns = 0


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


class Bench:
    """Real llama-servers and in-process gateways, all stopped at the end."""

    def __init__(self, tmp: Path, model: str | None = None) -> None:
        self.tmp = tmp
        self.model = model  # a GGUF's path; None: SmolLM2
        self.servers = []
        self.runners = []

    def server(self, *extra: str, slots_folder: Path | None = None):
        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        args = ("--slot-save-path", str(slots_folder)) if slots_folder else ()
        s = LlamaServer(folder, (*args, *extra), self.model)
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
