"""A busy session's turn hit by a crash, with checkpoints and without (issue 19, item 2).

    make bench    (or: .venv/bin/python bench/bench_crash.py [--turns N] [--every K] [--cli N])

The goal measured: with llama-server killed by SIGSEGV in the middle of a turn, the turn hit by the
crash costs under 2x a warm turn plus the restore. Before issue 19 a busy session was never saved
(the idle save waits kv_save_idle_seconds, 2 s, with nobody waiting, and a tool loop sends its next
turn within a second), so every crash-hit turn re-prefilled the whole conversation.

Two supervised stacks (supervisord, llama-server with SmolLM2, the gateway) in a temporary folder,
one after the other, the same session on each, the idle save left at its default (2 s):

  checkpoints   the defaults: kv_park on, kv_checkpoint_share 0.05 (a busy conversation is saved
                before its next turn once the tokens not on disk pass 5% of it)
  none          kv_park = false: only the idle save, which a busy session never reaches

The session is Claude Code's captured main request (3 of its tools, streaming, a new billing line
on every request) growing like its tool loop: each turn appends the model's Bash call and its
result (~100 tokens of a source file), each sent 1 s after the last answer. Every K-th turn
llama-server gets kill -SEGV while that turn is in flight (at a random point of a warm turn's
time: its prefill, or its first tokens). supervisord restarts it; the gateway restores a save
before it reopens its queue and sends the turn again (a failure before any answer byte), or the
client sends it again (an error event after the first byte, as Claude Code does). Per crash-hit
turn, at the client: its whole time (first send to answer), llama-server's restart (kill to the
gateway ready again, less the restore), the restore, and the prompt tokens read from cache.

The goal compares the turn's cost outside llama-server's restart (the work lost before the kill,
the restore, and the work done again) with 2x the warm median plus the restore: restarting a
process and loading its model is not a turn's work, and on a big model it alone takes minutes.
The strict reading (the whole turn at the client) is printed beside it.

`--cli N` adds a short run of the real Claude Code CLI (`claude -p ... --continue`, N turns, a
crash in every 4th, soon after its main request is in the slot; answers cut at 128 tokens: at 48
the CLI gives up with "response exceeded the 48 output token maximum") on the same two stacks.
There each turn is a new CLI process, whose start takes longer than the idle save's 2 s, so both
stacks run with the idle save off (kv_save_idle_seconds 3600): a tool loop's turns, back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench_kv import kv_stack

from orchestrator.ops import supervise
from testkit.bench import machine
from testkit.bodies import claude_turn
from testkit.servers import ROOT
from testkit.stack import Stack

TURNS = 12
EVERY = 4          # a crash in every 4th turn: every 30-60 s here (the cadence: 2 minutes)
GAP = 1.0          # seconds from an answer to the next turn: under kv_save_idle_seconds (2 s)
MAX_TOKENS = 16
RESULT_CHARS = 420  # a tool result: ~100 of SmolLM2's tokens
VARIANTS = {
    "checkpoints": "",
    "none": "kv_park = false",
}


class Session:
    """Claude Code's main request growing like its tool loop: a Bash call and its result a turn."""

    def __init__(self) -> None:
        self.body = claude_turn("crash", 1)
        self.body["stream"], self.body["max_tokens"] = True, MAX_TOKENS
        self.source = "".join((ROOT / "orchestrator" / f).read_text() for f in ("kv/store.py", "request/parking.py"))
        self.turns = 0

    def next(self) -> dict:
        if self.turns:
            n = self.turns
            chunk = self.source[(n * RESULT_CHARS) % (len(self.source) - RESULT_CHARS):][:RESULT_CHARS]
            self.body["messages"] += [
                {"role": "assistant", "content": [
                    {"type": "text", "text": f"Reading part {n} of the file."},
                    {"type": "tool_use", "id": f"toolu_{n:04d}", "name": "Bash",
                     "input": {"command": f"sed -n {n * 10},{n * 10 + 9}p orchestrator/kv/store.py",
                               "description": f"Show part {n}"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{n:04d}", "content": chunk}]}]
        self.turns += 1
        self.body["system"][0]["text"] = (f"x-anthropic-billing-header: cc_version=2.1.332.c{self.turns:03d}; "
                                          f"cc_entrypoint=cli;")
        return json.loads(json.dumps(self.body))


@dataclass
class Turn:
    n: int
    total: float = 0.0       # first send to the answer's end, at the client
    first_token: float | None = None  # perf_counter of the first content_block_delta
    prompt: int = 0
    from_cache: int = 0
    sends: int = 0           # the client's sends (a second one after an error event)
    slot_seconds: float = 0.0  # the gateway's park/checkpoint/unpark before the send
    reason: str = ""
    crash: dict = field(default_factory=dict)


async def send_turn(http, url: str, body: dict, turn: Turn) -> None:
    """One streamed turn, sent again (as Claude Code does) while it ends in an error."""
    t0 = time.perf_counter()
    for _ in range(5):
        turn.sends += 1
        usage, event, failed = {}, "", False
        async with http.post(url + "/v1/messages", json=body) as r:
            if r.status != 200:
                failed = True
                await r.read()
            else:
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        failed = failed or event == "error"
                        if event == "content_block_delta" and turn.first_token is None:
                            turn.first_token = time.perf_counter()
                    elif line.startswith("data:") and event == "message_start":
                        usage = json.loads(line[5:])["message"].get("usage") or {}
        if not failed:
            turn.from_cache = usage.get("cache_read_input_tokens") or 0
            turn.prompt = (usage.get("input_tokens") or 0) + turn.from_cache
            turn.total = time.perf_counter() - t0
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"turn {turn.n} failed 5 times")


async def last_miss(s: Stack, http) -> dict:
    b = await s.backend(http)
    recent = (b.get("cache") or {}).get("recent") or []
    return recent[-1] if recent else {}


async def crash_during(s: Stack, http, task: asyncio.Task, turn: Turn, after: float) -> None:
    """kill -SEGV llama-server `after` s into the turn; wait for the gateway to be ready again."""
    await asyncio.sleep(after)
    sent = time.perf_counter() - after
    b = await s.backend(http)
    before, busy = b["restarts"], b["busy"]
    killed = time.perf_counter()
    phase = "after the answer" if task.done() else "prefill" if turn.first_token is None else "generation"
    os.kill(s.pid("llama-primary"), signal.SIGSEGV)
    async with asyncio.timeout(30):
        while (await s.backend(http))["state"] == "ready":
            await asyncio.sleep(0.01)
    b = await s.ready(http, before + 1)
    restore = b.get("kv_restore") or {}
    turn.crash = {"at": killed - sent, "phase": phase, "back": time.perf_counter() - killed,
                  "restore_s": float(restore.get("seconds") or 0) if restore.get("result") == "restored" else 0.0,
                  "restored": int(restore.get("n_tokens") or 0) if restore.get("result") == "restored" else 0,
                  "result": restore.get("result", "none"), "busy": busy}


async def play(s: Stack, http, turns: int, every: int, rng: random.Random) -> list[Turn]:
    session, rows = Session(), []
    await s.ready(http)
    for n in range(1, turns + 1):
        if n > 1:
            await asyncio.sleep(GAP)
        turn = Turn(n)
        task = asyncio.create_task(send_turn(http, s.url, session.next(), turn))
        if n % every == 0:
            # A point inside the fastest warm turn so far: its prefill or its first tokens, not after it.
            fastest = min(r.total for r in rows[1:] if not r.crash)
            await crash_during(s, http, task, turn, rng.uniform(0.1, 0.6) * fastest)
        await task
        miss = await last_miss(s, http)
        turn.slot_seconds, turn.reason = float(miss.get("slot_seconds") or 0), miss.get("reason", "")
        rows.append(turn)
        print(f"  turn {n:2d}: {turn.total:6.2f} s, {turn.from_cache}/{turn.prompt} from cache, {turn.reason}"
              f"{f', slot {turn.slot_seconds * 1000:.0f} ms' if turn.slot_seconds else ''}"
              f"{f', crash {turn.crash}' if turn.crash else ''}", flush=True)
    return rows


async def checkpoint_metric(s: Stack, http) -> tuple[float, float]:
    async with http.get(s.url + "/metrics") as r:
        text = await r.text()
    total = count = 0.0
    for line in text.splitlines():
        if 'action="checkpoint"' in line and 'backend="primary"' in line:
            if line.startswith("orchestrator_kv_park_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("orchestrator_kv_park_seconds_count"):
                count = float(line.rsplit(" ", 1)[1])
    return count, total


async def each_variant(binary: str, label: str, idle: float, extra: str, player) -> dict[str, dict]:
    """`player(stack, http)` on a fresh stack of each variant, one after the other: its rows, the
    checkpoints counted and the load average."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-crash-{label.replace(' ', '-')}-") as tmp:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=600)) as http:
            for name, settings in VARIANTS.items():
                print(f"{label}, {name}:", flush=True)
                s = kv_stack(Path(tmp) / name, binary, True, idle=idle, settings=settings + extra)
                try:
                    s.up()
                    rows = await player(s, http)
                    out[name] = {"rows": rows, "checkpoints": await checkpoint_metric(s, http),
                                 "load": os.getloadavg()}
                finally:
                    s.down()
    return out


async def run(binary: str, turns: int, every: int) -> dict[str, dict]:
    return await each_variant(binary, "session", 2.0, "",
                              lambda s, http: play(s, http, turns, every, random.Random(1)))


# ---- the real CLI ------------------------------------------------------------------------------

CLI_PROMPTS = ["Say hello in one short sentence.", "Name a prime number between 10 and 20.",
               "Say which one you named, in one sentence.", "Now name a colour.",
               "Write one line of Python that prints it.", "What does that line print?"]


async def cli_play(s: Stack, http, binary: str, turns: int, rng: random.Random) -> list[Turn]:
    """`claude -p PROMPT --continue`, one CLI process a turn; a crash in every 4th, while its main
    request holds the slot."""
    from orchestrator.configfile import load_config
    from orchestrator.ops import claude_env

    home, project = Path(s.paths.root) / "home", Path(s.paths.root) / "project"
    home.mkdir(exist_ok=True)
    project.mkdir(exist_ok=True)
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "customApiKeyResponses": {"approved": ["none"], "rejected": []},
        "projects": {str(project): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}}}))
    await s.ready(http)
    async with http.get(s.url + "/health") as r:
        health = await r.json()
    env = {"PATH": f"{Path(shutil.which('node') or binary).parent}:/usr/bin:/bin", "HOME": str(home),
           "TERM": "xterm-256color",
           "DISABLE_TELEMETRY": "1", **claude_env.claude_environment(load_config(s.config_path), health)}
    rows = []
    for n in range(1, turns + 1):
        if n > 1:
            await asyncio.sleep(GAP)
        turn = Turn(n)
        args = ["-p", CLI_PROMPTS[(n - 1) % len(CLI_PROMPTS)], *(["--continue"] if n > 1 else [])]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(binary, *args, cwd=project, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        task = asyncio.create_task(proc.communicate())
        if n % 4 == 0:
            async with asyncio.timeout(120):  # its main request in the slot (housekeeping is synthetic)
                while (await s.backend(http))["busy"] == 0:
                    await asyncio.sleep(0.01)
            # At once: a CLI turn's main request takes ~0.3 s once its prefix is cached (a short answer),
            # so a later kill (0.3-1.5 s, tried first) landed after the answer.
            await crash_during(s, http, task, turn, rng.uniform(0.02, 0.2))
            turn.crash["at"] = time.perf_counter() - t0 - turn.crash["back"]  # from the CLI's start
            turn.crash["phase"] = "main request in the slot" if turn.crash["busy"] else "after the answer"
        out, err = await asyncio.wait_for(task, 600)
        turn.total = time.perf_counter() - t0
        if proc.returncode != 0:
            if b"output token maximum" not in out + err:
                raise RuntimeError(f"claude -p failed ({proc.returncode}): {out[-300:]!r} {err[-300:]!r}")
            # SmolLM2 rambled past max_output_tokens and the CLI gave up on the answer: the turn still
            # went through the model (its prompt and cache figures count); the next --continue goes on.
            print(f"  cli turn {n:2d}: the CLI gave up on an answer past max_output_tokens", flush=True)
        miss = await last_miss(s, http)
        turn.prompt, turn.from_cache = int(miss.get("prompt") or 0), int(miss.get("cached") or 0)
        turn.slot_seconds, turn.reason = float(miss.get("slot_seconds") or 0), miss.get("reason", "")
        rows.append(turn)
        print(f"  cli turn {n:2d}: {turn.total:6.2f} s, {turn.from_cache}/{turn.prompt} from cache, {turn.reason}"
              f"{f', crash {turn.crash}' if turn.crash else ''}", flush=True)
    return rows


async def cli_run(binary: str, claude: str, turns: int) -> dict[str, dict]:
    return await each_variant(binary, "real CLI", 3600, "\nmax_output_tokens = 128",
                              lambda s, http: cli_play(s, http, claude, turns, random.Random(2)))


# ---- the table ---------------------------------------------------------------------------------

def warm_median(rows: list[Turn]) -> float:
    return statistics.median(r.total for r in rows[1:] if not r.crash)


def verdict(ok: bool, crash: dict) -> str:
    if crash["phase"] == "after the answer":
        return "not mid-turn (the next turn paid for it)"
    return "holds" if ok else "FAILS"


def table(figures: dict[str, dict], title: str) -> list[str]:
    lines = [title, "| crash-hit turn | " + " | ".join(figures) + " |", "|---|" + "---|" * len(figures)]
    names = list(figures)
    hit = [r.n for r in figures[names[0]]["rows"] if r.crash]
    verdicts = {n: [] for n in names}
    for i in hit:
        cells = []
        for name in names:
            rows = figures[name]["rows"]
            r, warm = rows[i - 1], warm_median(rows)
            c = r.crash
            restart = c["back"] - c["restore_s"]
            cost = r.total - restart
            ok = cost < 2 * warm + c["restore_s"]
            if c["phase"] != "after the answer":  # not a crash-hit turn: the next one paid for it
                verdicts[name].append((ok, r.total < 2 * warm + c["restore_s"], cost / warm))
            cells.append(f"{r.total:.2f} s ({r.total / warm:.1f}x warm), restart {restart:.2f} s, restore "
                         f"{c['restore_s'] * 1000:.0f} ms of {c['restored']:,}, {r.from_cache:,}/{r.prompt:,} "
                         f"from cache; cost {cost:.2f} s = {cost / warm:.1f}x warm: {verdict(ok, c)} "
                         f"(killed {c['at']:.2f} s in, {c['phase']})")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines.append("| warm median | " + " | ".join(f"{warm_median(figures[n]['rows']):.2f} s" for n in names) + " |")
    cp = []
    for n in names:
        count, total = figures[n]["checkpoints"]
        slot = [r.slot_seconds for r in figures[n]["rows"] if r.slot_seconds]
        cp.append(f"{count:.0f} in {len(figures[n]['rows'])} turns, mean {total / count * 1000:.0f} ms, "
                  f"max {max(slot) * 1000:.0f} ms before a send" if count else "none")
    lines.append("| checkpoints (delay to the turn) | " + " | ".join(cp) + " |")
    lines.append("| load average at the end | " + " | ".join(
        ", ".join(f"{x:.2f}" for x in figures[n]["load"]) for n in names) + " |")
    for n in names:
        held = sum(v[0] for v in verdicts[n])
        strict = sum(v[1] for v in verdicts[n])
        worst = max((v[2] for v in verdicts[n]), default=float("nan"))
        lines.append(f"goal ({n}): crash-hit turn (killed mid-turn), outside llama-server's restart, < 2x warm + "
                     f"restore: {held} of {len(verdicts[n])} hold (worst {worst:.1f}x warm); "
                     f"the whole turn at the client: {strict} of {len(verdicts[n])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument("--cli", type=int, default=0, help="real Claude Code CLI turns (0: none)")
    parser.add_argument("--cli-only", action="store_true")
    args = parser.parse_args()
    binary = os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or supervise.find_llama_server()
    print(machine())
    t0 = time.monotonic()
    if not args.cli_only:
        figures = asyncio.run(run(binary, args.turns, args.every))
        # Printed before the CLI's part, which takes long.
        print("\n".join(table(figures, f"\nA busy session ({args.turns} turns {GAP:g} s apart), kill -SEGV in "
                                         f"every {args.every}th turn: checkpoints vs none")), flush=True)
    if args.cli:
        import subprocess

        claude = subprocess.run([str(ROOT / "deploy" / "install-claude-code.sh")], check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
        cli = asyncio.run(cli_run(binary, claude, args.cli))
        print("\n".join(table(cli, f"\nThe real Claude Code CLI ({args.cli} turns of `claude -p --continue`), "
                                     f"kill -SEGV in every 4th: checkpoints vs none")))
    print(f"\n{machine()}\n(bench took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
