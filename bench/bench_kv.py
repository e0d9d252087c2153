"""KV persistence, side by side in one run (called by bench_gateway.py; issue 10).

Two supervised stacks (supervisord, llama-server with SmolLM2, the gateway) in a
temporary folder, one after the other: A with `kv_save = true`, B with
`kv_save = false`; both play the same Claude Code conversation (its real main
request, 3 tools, streaming, max_tokens 4). Time to first token is measured at
the client: from sending the request to its first `content_block_delta`.

  (a) cold first turn          (b) warm second turn
  (e) a tool-loop of turns: each sent right after the last one finished (no save
      can start), or sent just after kv_save_idle_seconds, when A's save runs; a
      turn counts as "during a save" only when the save's file was started before
      and its metadata written after the turn was sent (B: the same delays, no save)
  (c)/(d) kill -SEGV llama-server once the last save is on disk; supervisord
      restarts it; when the gateway reports it ready (A: restored first) the next
      turn is sent: A after SEGV with restore, B after SEGV without.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from orchestrator.ops import supervise
from testkit.bodies import claude_turn
from testkit.stack import Stack

IDLE = 0.5            # kv_save_idle_seconds here (2 s by default): a shorter run, the same policy
LOOP = 6              # tool-loop turns of each kind
DELAYS = (0.0, 0.005, 0.01, 0.02)  # after IDLE: aims at a save in progress (it lasts tens of ms)




def kv_stack(root: Path, binary: str, kv: bool, idle: float = IDLE, settings: str = "") -> Stack:
    """The stack with KV saves on or off (8k context, a fixed seed); `settings`: more lines for the
    backend's table (bench_crash.py's variants)."""
    return Stack(root, binary=binary, ctx_size=8192, seed=True,
                 settings=f"kv_save = {'true' if kv else 'false'}\nkv_save_idle_seconds = {idle}\n{settings}")


class Conversation:
    """A Claude Code conversation that grows by one exchange a turn, like its tool loop."""

    def __init__(self) -> None:
        self.body = claude_turn("kv", 1)
        self.body["stream"] = True
        self.turns = 0

    def next(self) -> dict:
        if self.turns:
            self.body["messages"] += [
                {"role": "assistant", "content": [{"type": "text", "text": f"Step {self.turns} done."}]},
                {"role": "user", "content": [{"type": "text", "text": f"Good. Now do step {self.turns + 1}."}]}]
        self.turns += 1
        cch = f"{self.turns:03d}"  # a new billing line every request, as Claude Code sends it
        self.body["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.332.{cch}; cc_entrypoint=cli;"
        return json.loads(json.dumps(self.body))


async def turn(http, url: str, body: dict) -> dict:
    """One streaming turn: time to first content_block_delta, end, usage; sent at `sent` (wall clock)."""
    sent, t0 = time.time(), time.perf_counter()
    ttft, usage, event = None, {}, ""
    async with http.post(url + "/v1/messages", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "content_block_delta" and ttft is None:
                    ttft = time.perf_counter() - t0
            elif line.startswith("data:") and event in ("message_start", "message_delta"):
                data = json.loads(line[5:])
                u = (data.get("message") or {}).get("usage") if event == "message_start" else data.get("usage")
                for k, v in (u or {}).items():
                    if isinstance(v, int) and v >= usage.get(k, 0):
                        usage[k] = v
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "sent": sent, "done": time.time(),
            "from_cache": usage.get("cache_read_input_tokens", 0),
            "prompt": usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)}


async def play(s: Stack, http, kv: bool) -> dict:
    """The whole sequence on one stack; its figures."""
    out: dict = {}
    conv = Conversation()
    await s.ready(http)
    out["cold"] = await turn(http, s.url, conv.next())
    out["warm"] = await turn(http, s.url, conv.next())

    # (e) the tool loop: alternately at once and just after the idle moment.
    at_once, after_idle, during_save = [], [], []
    for i in range(2 * LOOP):
        if i % 2 == 0:
            at_once.append(await turn(http, s.url, conv.next()))
            continue
        await asyncio.sleep(IDLE + DELAYS[(i // 2) % len(DELAYS)])
        t = await turn(http, s.url, conv.next())
        after_idle.append(t)
        save = s.newest_save() if kv else None  # read before this turn's own save (IDLE later)
        if save is not None and save[0] <= t["sent"] + 0.002 and save[1] >= t["sent"]:
            during_save.append(t)
    out["at_once"], out["after_idle"], out["during_save"] = at_once, after_idle, during_save
    last = after_idle[-1]

    if kv:  # the last turn's save on disk before the crash
        async with asyncio.timeout(30):
            while (s.newest_save() or (0, 0, 0))[1] < last["done"]:
                await asyncio.sleep(0.05)
        n = await s.metric(http, "orchestrator_kv_save_seconds_count")
        out["save_s"] = await s.metric(http, "orchestrator_kv_save_seconds_sum") / max(n, 1)
        out["saves"] = n
        out["save_bytes"] = s.newest_save()[2]

    # (c)/(d) kill -SEGV; supervisord restarts it; the gateway reopens its queue (after the restore).
    before = (await s.backend(http))["restarts"]
    killed = time.perf_counter()
    os.kill(s.pid("llama-primary"), signal.SIGSEGV)
    async with asyncio.timeout(20):
        while (await s.backend(http))["state"] == "ready":
            await asyncio.sleep(0.01)
    b = await s.ready(http, before + 1)
    out["back_s"] = time.perf_counter() - killed
    out["restore"] = b.get("kv_restore") or {}
    out["after_segv"] = await turn(http, s.url, conv.next())
    return out


async def run(binary: str) -> list[str]:
    """Both stacks, one after the other; the table's lines."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=300)) as http:
            for name, kv in (("on", True), ("off", False)):
                s = kv_stack(Path(tmp) / f"kv-{name}", binary, kv)
                try:
                    s.up()
                    figures[name] = await play(s, http, kv)
                finally:
                    s.down()
    return table(figures["on"], figures["off"])


def med(turns: list[dict], key: str = "ttft") -> float:
    return statistics.median(t[key] for t in turns) if turns else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def table(on: dict, off: dict) -> list[str]:
    cold, warm = on["cold"]["ttft"], on["warm"]["ttft"]
    after, cold_after = on["after_segv"]["ttft"], off["after_segv"]["ttft"]
    restore_s = float(on["restore"].get("seconds") or 0)
    rows = [
        ("(a) cold first turn", f"{cold:.2f}", f"{off['cold']['ttft']:.2f}", ""),
        ("(b) warm second turn", f"{warm:.2f}", f"{off['warm']['ttft']:.2f}", f"{cold / warm:.0f}x faster than cold"),
        ("(c/d) first turn after kill -SEGV", f"{after:.2f}", f"{cold_after:.2f}",
         f"with restore {cold_after / after:.0f}x faster than without; {cold / after:.0f}x faster than cold"),
        ("      its prompt tokens read from cache", f"{on['after_segv']['from_cache']}",
         f"{off['after_segv']['from_cache']}", f"of {on['after_segv']['prompt']}"),
        ("      kill to backend ready again (s)", f"{on['back_s']:.2f}", f"{off['back_s']:.2f}",
         f"restore {ms(restore_s)} of {on['restore'].get('n_tokens', 0):,} tokens"),
        (f"(e) tool-loop turn sent at once, median of {len(on['at_once'])}", f"{med(on['at_once']):.3f}",
         f"{med(off['at_once']):.3f}", f"{(med(on['at_once']) - med(off['at_once'])) * 1000:+.0f} ms (no save starts)"),
        (f"    sent {IDLE:g} s+ after the last, during a save ({len(on['during_save'])} of {len(on['after_idle'])})",
         f"{med(on['during_save']):.3f}", f"{med(off['after_idle']):.3f}",
         (f"{(med(on['during_save']) - med(off['after_idle'])) * 1000:+.0f} ms vs off, "
          f"{(med(on['during_save']) - med(on['at_once'])) * 1000:+.0f} ms vs at once")),
        ("    one save (mean of the run's saves)", ms(on["save_s"]), "", f"{on['save_bytes'] / 1e6:.0f} MB file"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["KV persistence: time to first token (s)", f"{'':<{width}}  {'kv_save on':>10}  {'off':>10}  ratio"]
    lines += [f"{label:<{width}}  {a:>10}  {b:>10}  {ratio}" for label, a, b, ratio in rows]
    goal = 2 * warm + restore_s
    ok1 = after < goal
    ok2 = 0.5 * cold < cold_after < 2 * cold  # a slightly longer prompt; a loaded machine varies
    lines.append(f"goal: after SEGV with restore {after:.2f} s < 2 x warm + restore = {goal:.2f} s: "
                 f"{'holds' if ok1 else 'FAILS'}")
    lines.append(f"goal: after SEGV without restore {cold_after:.2f} s ~ cold {cold:.2f} s "
                 f"({cold_after / cold:.2f}x, within 2x): "
                 f"{'holds' if ok2 else 'FAILS'}")
    return lines


if __name__ == "__main__":
    binary = os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or supervise.find_llama_server()
    print("\n".join(asyncio.run(run(binary))))
