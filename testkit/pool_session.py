"""Two Claude Code conversations on a pool of two real llama-servers (issue 13): interleaved turns,
and a failover while one streams. Run by bench/bench_pool.py (which prints it) and
tests/real/test_real_pool.py (which asserts on it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.metrics import AFFINITY_DECISIONS

from .bodies import GrowingConversation, notes, trimmed_turn
from .client import sample

TURNS = 4
# A few tokens of answer: the prompt is what this measures, and generation on one thread is slow.
MAX_TOKENS = 8
# The failover's streaming turn: long enough that the server is still generating when it dies.
STREAM_TOKENS = 64
# The system prompt's long block (5.7k characters) cut to this: with the two tools kept, the
# shared prefix stays about a third of a first turn (~500 of ~1,600 tokens), so a conversation
# on a server that has only the other one cached pays for most of its prompt.
SYSTEM_CHARS = 1500
TOOLS = ("Read", "Edit")
PROJECTS = ("shop-api", "photo-tool", "docs-site")


class Conversation(GrowingConversation):
    """One Claude Code conversation, growing by one exchange a turn as its main loop does."""

    def __init__(self, index: int) -> None:
        self.name = f"c{index + 1}"
        project = PROJECTS[index]
        # Claude Code puts the project's CLAUDE.md in a system-reminder before the user's words.
        claude_md = (f"Contents of /home/dev/{project}/CLAUDE.md (project instructions):\n\n"
                     f"{notes(index)}")
        system = sample("main-2.1.332.json")["body"]["system"][2]["text"][:SYSTEM_CHARS]
        body = trimmed_turn(TOOLS, system, claude_md, f"Read the notes above, then list what {project} needs next.",
                            MAX_TOKENS)
        env = body["messages"][1]
        env["content"][0]["text"] = env["content"][0]["text"].replace("/home/dev/project", f"/home/dev/{project}")
        self.body = body
        self.turns = 0


@dataclass
class Answer:
    status: int
    wall: float
    prompt: int = 0          # input_tokens + cache_read_input_tokens
    from_cache: int = 0      # cache_read_input_tokens
    text: str = ""
    events: list[str] = field(default_factory=list)
    error: dict | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.error is None and (not self.events or self.events[-1] == "message_stop")

    @property
    def share(self) -> float:
        return self.from_cache / self.prompt if self.prompt else 0.0


def _usage(answer: Answer, usage: dict) -> None:
    # llama-server's Anthropic usage: input_tokens excludes the tokens read from cache, streamed
    # (message_start carries both) and not alike.
    if isinstance(usage.get("cache_read_input_tokens"), int):
        answer.from_cache = usage["cache_read_input_tokens"]
    if isinstance(usage.get("input_tokens"), int):
        answer.prompt = usage["input_tokens"] + answer.from_cache


async def send(http, base: str, body: dict, on_event: Callable[[str], None] | None = None) -> Answer:
    """One request through the gateway, read to its end; `on_event` sees each SSE event's name."""
    t0 = time.perf_counter()
    async with http.post(base + "/v1/messages", json=body) as r:
        if not body.get("stream"):
            raw = await r.read()
            a = Answer(r.status, 0.0)
            if r.status == 200:
                message = json.loads(raw)
                _usage(a, message.get("usage") or {})
                a.text = "".join(b.get("text", "") for b in message.get("content", []) if b.get("type") == "text")
            else:
                a.error = json.loads(raw)
            a.wall = time.perf_counter() - t0
            return a
        a = Answer(r.status, 0.0)
        event = ""
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                if event != "ping":
                    a.events.append(event)
                    if on_event is not None:
                        on_event(event)
            elif line.startswith("data:") and event in ("message_start", "content_block_delta", "error"):
                data = json.loads(line[5:])
                if event == "message_start":
                    _usage(a, data["message"].get("usage") or {})
                elif event == "content_block_delta":
                    a.text += data["delta"].get("text", "")
                else:
                    a.error = data
        a.wall = time.perf_counter() - t0
        return a


@dataclass
class Row:
    label: str
    backend: str
    answer: Answer


def served_by(app, before: dict[str, int], body: dict) -> str:
    """The backend that answered a request sent since `before` (each backend's slots granted so far):
    "a>b" when it was sent to a, failed there before answering and was sent again to b."""
    from orchestrator.backends.gateway import GATEWAY
    from orchestrator.conversation import conversation_key

    gw = app[GATEWAY]
    names = [n for n, q in ((b.name, b.queue) for b in gw.backends.values()) if q.acquired_total > before.get(n, 0)]
    if len(names) > 1 and gw.pool is not None:
        home = gw.pool.homes.get(conversation_key(body, gw.config.routing.strip_billing_header))
        return ">".join([n for n in names if n != home] + [home])
    return ",".join(names) or "-"


def granted(app) -> dict[str, int]:
    from orchestrator.backends.gateway import GATEWAY

    return {n: q.acquired_total for n, q in ((b.name, b.queue) for b in app[GATEWAY].backends.values())}


def pool_config(urls: dict[str, str], affinity: bool) -> dict:
    """Two [[backends]] for the same models: one pool."""
    return {"backends": [{"name": name, "url": url, "models": ["*"], "slots": 1,
                          # Run by hand, not supervised: nothing to save a slot to.
                          "kv_save": False} for name, url in urls.items()],
            "routing": {"affinity": affinity}}


async def interleaved(http, base: str, app, turns: int = TURNS) -> list[Row]:
    """c1 turn 1, c2 turn 1, c1 turn 2, ... one request at a time."""
    convs = [Conversation(0), Conversation(1)]
    answers: dict[str, str | None] = {c.name: None for c in convs}
    rows = []
    for _ in range(turns):
        for c in convs:
            before, body = granted(app), c.next(answers[c.name])
            a = await send(http, base, body)
            assert a.complete, f"{c.name} turn {c.turns}: {a}"
            answers[c.name] = a.text
            rows.append(Row(f"{c.name} turn {c.turns}", served_by(app, before, body), a))
    return rows


@dataclass
class Failover:
    rows: list[Row]
    streamed: Answer          # conversation 2's turn, streaming when its server died
    waiting: Answer           # a request of conversation 2 waiting behind it: moved
    killed: str
    decisions: dict[str, dict[str, float]]


def decisions(app) -> dict[str, dict[str, float]]:
    from orchestrator.backends.gateway import GATEWAY

    metric = app[GATEWAY].metrics.affinity
    return {n: {d: metric.labels(n, d)._value.get() for d in AFFINITY_DECISIONS} for n in app[GATEWAY].backends}


async def failover(http, base: str, app, pids: dict[str, int],
                   restart: Callable[[str], int] | None = None) -> Failover:
    """Turns 1-2 of both and c1's turn 3; then c2's turn 3 streams on its server, a second request of
    c2 waits behind it, and the server is killed at the stream's first token; the client retries
    the broken stream; then both conversations' turn 4 on the survivor.

    With `restart` (start the named server again on its address; its new pid): the killed one comes
    back and takes a new conversation c3 (the survivor is home to two); then the survivor is killed
    between turns, idle, and the next turns are sent at once, before a health check can notice:
    c1 and c2 move back, each paying one cold prefill, and their turn 6 and c3's turn 2 are warm."""
    from orchestrator.backends.gateway import GATEWAY

    gw = app[GATEWAY]
    c1, c2 = Conversation(0), Conversation(1)
    answers: dict[str, str | None] = {"c1": None, "c2": None}
    rows: list[Row] = []

    async def play(c: Conversation, label: str = "") -> Answer:
        before, body = granted(app), c.next(answers[c.name])
        a = await send(http, base, body)
        assert a.complete, f"{c.name} turn {c.turns}: {a}"
        answers[c.name] = a.text
        rows.append(Row(label or f"{c.name} turn {c.turns}", served_by(app, before, body), a))
        return a

    for _ in range(2):
        await play(c1)
        await play(c2)
    await play(c1)
    home = rows[-2].backend  # c2's, since its first turn
    survivor = next(n for n in gw.backends if n != home)
    body = c2.next(answers["c2"])
    first_token = asyncio.Event()

    def on_event(event: str) -> None:
        # Frozen at its first token, the server has more of the answer to send: it dies mid-stream.
        if event == "content_block_delta" and not first_token.is_set():
            os.kill(pids[home], signal.SIGSTOP)
            first_token.set()

    before = granted(app)
    streaming = asyncio.create_task(send(http, base, {**body, "max_tokens": STREAM_TOKENS}, on_event))
    # A second request of c2 (non-streaming: the other usage shape) in line behind it, on its home.
    while gw.backends[home].queue.busy == 0:
        await asyncio.sleep(0.005)
    waiting = asyncio.create_task(send(http, base, {**body, "stream": False}))
    async with asyncio.timeout(120):
        while gw.backends[home].queue.depth == 0:
            await asyncio.sleep(0.005)
        await first_token.wait()
    os.kill(pids[home], signal.SIGKILL)
    streamed, moved = await streaming, await waiting
    after = granted(app)
    # One slot granted on each: the streaming one on its home, the waiting one on the survivor.
    took = {n: after[n] - before[n] for n in after}
    rows.append(Row(f"c2 turn 3, streaming: {home} killed", home if took[home] == 1 else "?", streamed))
    rows.append(Row("c2 turn 3, waiting behind it: moved", survivor if took[survivor] == 1 else "?", moved))
    # The client sends the broken turn again, as Claude Code retries an overloaded error.
    before = granted(app)
    retry = await send(http, base, body)
    answers["c2"] = retry.text
    rows.append(Row("c2 turn 3, the client's retry", served_by(app, before, body), retry))
    await play(c1)
    await play(c2)
    if restart is not None:
        pids[home] = restart(home)
        async with asyncio.timeout(60):
            while not gw.backends[home].health.up:
                await asyncio.sleep(0.05)
        c3 = Conversation(2)
        answers["c3"] = None
        await play(c3, f"{home} back: c3 turn 1 (new)")
        os.kill(pids[survivor], signal.SIGKILL)
        await play(c1, f"{survivor} killed idle: c1 turn 5")
        await play(c2, "c2 turn 5")
        await play(c1)
        await play(c2)
        await play(c3)
    return Failover(rows, streamed, moved, home, decisions(app))


def pct(a: Answer) -> str:
    return f"{a.share * 100:.0f}%" if a.prompt else "-"


def comparison_table(columns: dict[str, list[Row]]) -> list[str]:
    """Per turn: backend, tokens from cache of the prompt, and wall time, one column per run."""
    names = list(columns)
    first = columns[names[0]]
    head = f"{'turn':<10}" + "".join(f" | {n:^36}" for n in names)
    sub = f"{'':<10}" + "".join(f" | {'backend':>7} {'cached/prompt':>15} {'wall s':>9}" for _ in names)
    lines = [head, sub]
    for i, row in enumerate(first):
        cells = []
        for n in names:
            r = columns[n][i]
            cells.append(f" | {r.backend:>7} {f'{r.answer.from_cache}/{r.answer.prompt}':>10} {pct(r.answer):>4} "
                         f"{r.answer.wall:>9.2f}")
        lines.append(f"{row.label:<10}" + "".join(cells))
    # Totals over the turns after each conversation's first.
    later = {n: [r for r in columns[n] if not r.label.endswith(" 1")] for n in names}
    cached = {n: sum(r.answer.from_cache for r in later[n]) for n in names}
    prompt = {n: sum(r.answer.prompt for r in later[n]) for n in names}
    wall = {n: sum(r.answer.wall for r in later[n]) for n in names}
    lines.append(f"{f'turns 2-{TURNS}':<10}" + "".join(
        f" | {'':>7} {f'{cached[n]}/{prompt[n]}':>10} {cached[n] * 100 / max(prompt[n], 1):>3.0f}% {wall[n]:>9.2f}"
        for n in names))
    base = names[0]
    for n in names[1:]:
        lines.append(f"{base} vs {n}, turns 2-{TURNS}: {wall[n] / max(wall[base], 1e-9):.1f}x less wall time, "
                     f"{(prompt[n] - cached[n]) / max(prompt[base] - cached[base], 1):.1f}x fewer prompt tokens "
                     f"computed ({prompt[base] - cached[base]} vs {prompt[n] - cached[n]})")
    return lines


def failover_table(f: Failover) -> list[str]:
    lines = [f"failover (affinity on): server {f.killed!r} SIGKILLed at the first token of c2's streaming turn 3"
             + (", then back; then the other one killed idle" if len(f.rows) > 10 else ""),
             f"{'turn':<38} {'backend':>7} {'cached/prompt':>15} {'wall s':>8}  outcome"]
    for r in f.rows:
        a = r.answer
        outcome = "complete" if a.complete else (
            f"SSE error {((a.error or {}).get('error') or {}).get('type', '?')} after {a.events.count('content_block_delta')} "
            f"deltas" if a.error else f"HTTP {a.status}")
        lines.append(f"{r.label:<38} {r.backend:>7} {f'{a.from_cache}/{a.prompt}':>10} {pct(a):>4} {a.wall:>8.2f}  "
                     f"{outcome}")
    nonzero = {n: {d: int(v) for d, v in ds.items() if v} for n, ds in f.decisions.items()}
    lines.append(f"orchestrator_affinity_decisions_total: {nonzero}")
    return lines
