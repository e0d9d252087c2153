"""Issue 19 with the real Claude Code CLI: a session with two background agents on the default stack
(one-slot llama-server with SmolLM2, its grammar, saves on), and each conversation's turns after its
first read at least 80% of their prompt from cache.

SmolLM2 cannot call the `Agent` tool, so a scripting pass-through (testkit.proxy) between the
gateway and the real llama-server plays the turns it cannot: the main conversation's first turn
launches two agents, and each agent's first turn reads a file of the project. Those turns are still
prefilled by the real server first, so its slot and its cache figures are real; every other turn is
the real server's own answer. The three conversations (main and two agents, each with its own system
prompt and history) then take turns on the one slot.

llama-server runs with `--cache-ram 0`: its host-memory prompt cache would otherwise bring back a
switched-out conversation by itself while it fits (SmolLM2's KV is small), and the test would not
show that the gateway's parking did it. Without parking (`kv_park = false`) the later turns read
~0% from cache and this test fails. Run with -s for the per-turn table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_claude_code import claude_env_for, claude_home, run_claude, start_for_claude  # noqa: F401
from testkit.proxy import Proxy
from testkit.scripts import first_user_text, tool_results
from testkit.servers import ROOT, LlamaServer

pytestmark = pytest.mark.real

GOAL = 0.80
TASK = re.compile(r"AGENT-TASK-([a-z]+)")
AGENTS = ["alpha", "beta"]
NOTES = "NOTES.md"


def agent_calls(body: dict) -> list[dict]:
    """The main conversation's first answer: both agents, in the background where the CLI lets one ask."""
    (tool,) = [t for t in body["tools"] if t["name"] in ("Agent", "Task")]
    background = "run_in_background" in tool.get("input_schema", {}).get("properties", {})
    calls = []
    for i, name in enumerate(AGENTS):
        args = {"description": f"Survey part {i + 1}", "subagent_type": "general-purpose",
                "prompt": f"AGENT-TASK-{name}: read {NOTES} and report one line."}
        if background:
            args["run_in_background"] = True
        calls.append({"type": "tool_use", "id": f"toolu_agent_{name}", "name": tool["name"], "input": args})
    return calls


def script(project: Path):
    """The turns SmolLM2 cannot play; None: the real server answers."""

    def play(body: dict) -> list[dict] | None:
        tools = {t.get("name") for t in body.get("tools") or []}
        if tool_results(body):
            return None
        task = TASK.search(first_user_text(body))
        if task is not None:  # an agent's first turn: one cheap tool call in the project
            return [{"type": "tool_use", "id": f"toolu_read_{task.group(1)}", "name": "Read",
                     "input": {"file_path": str(project / NOTES)}}]
        if tools & {"Agent", "Task"}:
            return agent_calls(body)
        return None

    return play


def role(body: dict) -> str:
    task = TASK.search(first_user_text(body))
    return task.group(1) if task else "main"


@dataclass
class Row:
    conversation: str
    turn: int
    scripted: bool
    prompt: int
    cached: int
    reason: str

    @property
    def share(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0


class CacheLog(logging.Handler):
    """The gateway's per-turn cache line (cachemiss.py): backend, conversation, reason, cached, prompt."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.turns: list[tuple] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.turns.append(record.args)


@pytest.fixture
def cache_log():
    handler, logger = CacheLog(), logging.getLogger("orchestrator.kv.cachemiss")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def one_slot(tmp_path):
    """The default stack's llama-server (one slot, its grammar), saving slots, without a host cache."""
    saves = tmp_path / "slots"
    saves.mkdir()
    server = LlamaServer(tmp_path, ("--grammar-file", str(ROOT / "deploy" / "short-answers.gbnf"),
                                    "--slot-save-path", str(saves), "--cache-ram", "0"))
    server.start()
    yield server, saves
    server.stop()


def rows(proxy: Proxy, log: CacheLog) -> list[Row]:
    """Each turn the real server prefilled, in order, with the reason the gateway gave it. The slot
    runs one request at a time, so the gateway's per-turn lines come in the proxy's order: joined so,
    and checked by their figures."""
    turns = [t for t in proxy.turns if t.status == 200]
    logged = [(a[2], a[3], a[4]) for a in log.turns]  # reason, cached, prompt
    assert [(c, p) for _, c, p in logged] == [(t.cached, t.prompt) for t in turns], (logged, turns)
    count: dict[str, int] = {}
    out = []
    for t, (reason, _, _) in zip(turns, logged):
        name = role(t.body)
        count[name] = count.get(name, 0) + 1
        out.append(Row(name, count[name], t.scripted, t.prompt, t.cached, reason))
    return out


def table(rows: list[Row]) -> str:
    lines = ["| # | conversation | turn | answered by | cached/prompt | reason |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r.conversation} | {r.turn} | {'script' if r.scripted else 'SmolLM2'} | "
                     f"{r.cached}/{r.prompt} ({r.share:.0%}) | {r.reason} |")
    return "\n".join(lines)


async def test_two_background_agents_read_their_later_turns_from_cache(one_slot, gateway, serve_app, http,
                                                                       claude_home, cache_log):
    home, project = claude_home
    (project / NOTES).write_text("The gateway parks each conversation's KV cache on disk.\n")
    llama, saves = one_slot
    proxy = Proxy(llama.url, script(project))
    url = await serve_app(proxy.app())
    # The default stack's backend (deploy/orchestrator.toml) with its saves in the server's folder.
    base, gw, config, health = await start_for_claude(gateway, http, {
        "backends": [{"name": "primary", "url": url, "slots": 1, "max_output_tokens": 256,
                      "kv_save_dir": str(saves)}],
        "routing": {"background": "synthetic"}})
    env = claude_env_for(config, health, home)
    code, out, err = await run_claude(["-p", "Delegate the survey to two agents, then report.",
                                       "--allowedTools", "Agent,Task,Read"], env, project, timeout=900)
    assert code == 0, (out, err)
    table_rows = rows(proxy, cache_log)
    print("\n" + table(table_rows))
    # The session happened as scripted: main and both agents, each with a turn after its first.
    by = {name: [r for r in table_rows if r.conversation == name] for name in ["main", *AGENTS]}
    assert all(len(turns) >= 2 for turns in by.values()), table_rows
    # Interleaved on the one slot: some conversation's later turn came right after another's.
    assert any(a.conversation != b.conversation and b.turn > 1 for a, b in zip(table_rows, table_rows[1:]))
    later = [r for r in table_rows if r.turn > 1]
    assert all(r.share >= GOAL for r in later), table(table_rows)
    # A later turn that followed another conversation on the slot read its cache because it was unparked.
    switched = [b for a, b in zip(table_rows, table_rows[1:]) if b.turn > 1 and a.conversation != b.conversation]
    assert all(r.reason == "unparked" for r in switched), table(table_rows)
