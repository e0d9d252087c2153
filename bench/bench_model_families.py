"""Crash restore and parking on each model family (issue 26), side by side in one run.

    .venv/bin/python bench/bench_model_families.py [--family dense --family sliding_window ...]

Families: dense (SmolLM2-135M), sliding_window (Gemma 3 270M, real weights: a 512-token window on 15 of
18 layers), hybrid (the tiny random-weight model deploy/install-hybrid-model.sh builds). Per family,
the same two checks:

  crash    the default stack's config with the model swapped, under real supervisord: Claude Code's
           main request (three tools) cold, then warm, the idle save, kill -SEGV, and once the backend
           is ready again (its save restored first) the same turn again. Time and prompt read from
           cache per turn; the restored turn against the warm one.
  parking  three conversations of one session (a main and two agents) taking turns on one slot:
           --cache-ram 0 and parking on (dense, sliding window), or the prompt cache in RAM and no
           parking (hybrid, whose restores cannot bring a chat back): the later turns' share read
           from cache and their time to first token, beside the first (cold) turns.

Whatever flags the gateway puts on the supervised command are on (the sliding-window model's
--swa-full); the parking servers are started with them too. Figures on a shared machine are noisy:
compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import aiohttp

from testkit.bench import machine
from testkit.models import family_model
from testkit.parking_session import Bench, later_turns
from testkit.stack import Stack, wait_health

FAMILIES = ("dense", "sliding_window", "hybrid")
# What the gateway would put on a supervised server of the family, for the unsupervised parking runs.
# A hybrid's slot is not parked (its restores cannot bring a chat back): its switches are left to the
# prompt cache in RAM, as the gateway does for a supervised one (engines/model_cache.py).
PARKING = {"dense": (True, "--cache-ram", "0"), "sliding_window": (True, "--cache-ram", "0", "--swa-full"),
           "hybrid": (False,)}


def claude_turn() -> dict:
    from testkit.client import sample

    body = json.loads(json.dumps(sample("main-2.1.332.json")["body"]))
    body["tools"], body["max_tokens"], body["stream"] = body["tools"][:3], 4, False
    body["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": "First turn: say hi."}]}
    return body


async def timed(http, url: str, body: dict) -> tuple[int, int, float]:
    """(prompt tokens, read from cache, seconds) of one turn."""
    t0 = time.perf_counter()
    async with http.post(url + "/v1/messages", json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:300]
    u = json.loads(raw)["usage"]
    return u["input_tokens"] + u["cache_read_input_tokens"], u["cache_read_input_tokens"], time.perf_counter() - t0


async def crash(http, family: str, root: Path) -> dict:
    s = Stack(root, model=family_model(family), ctx_size=8192, settings="kv_save_idle_seconds = 0.5")
    try:
        s.up()
        b = await s.ready(http, timeout=180)
        body = claude_turn()
        cold = await timed(http, s.url, body)
        warm = await timed(http, s.url, body)
        saves_on = (await s.backend(http)).get("kv_saves", {}).get("on", True)
        async with asyncio.timeout(120):  # the idle save, where saves can pay off
            while saves_on and await s.metric(http, 'orchestrator_kv_saves_total{backend="primary",result="saved"}') < 1:
                await asyncio.sleep(0.1)
        os.kill(s.pid("llama-primary"), signal.SIGSEGV)
        async with asyncio.timeout(60):
            while (await wait_health(http, s.url))["backends"][0]["state"] == "ready":
                await asyncio.sleep(0.02)
        # Once it is back (its save restored first): the turn's own cost, beside the warm one's.
        restore = (await s.ready(http, restarts=1, timeout=180))["kv_restore"] or {"result": "no save (saves off)"}
        after = await timed(http, s.url, body)
        return {"model": b["model_cache"]["line"], "cold": cold, "warm": warm, "after": after,
                "restore": restore, "flags": "--swa-full" if "--swa-full" in s.paths.conf.read_text() else ""}
    finally:
        s.down()


async def parking(http, family: str, root: Path, turns: int) -> list:
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(root, family_model(family))
    try:
        return await bench.one_server(http, turns, *PARKING[family])
    finally:
        await bench.close()


def share(prompt: int, cached: int) -> str:
    return f"{cached:,}/{prompt:,} ({cached / prompt:.0%})" if prompt else "-"


async def main(families: list[str], turns: int) -> None:
    print(machine())
    results: dict[str, dict] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:
        for family in families:
            with tempfile.TemporaryDirectory() as tmp:
                c = await crash(http, family, Path(tmp) / "crash")
                rows = await parking(http, family, Path(tmp) / "parking", turns)
            results[family] = {"crash": c, "parking": rows}
            print(f"{family}: {c['model']}", flush=True)
    print("\n| check | " + " | ".join(families) + " |\n|---|" + "---|" * len(families))
    cells = {f: results[f] for f in families}
    print("| flags the gateway adds | " + " | ".join(c["crash"]["flags"] or "none" for c in cells.values()) + " |")
    for label, key in (("crash: cold turn", "cold"), ("crash: warm turn", "warm"), ("crash: after SEGV + restore", "after")):
        print(f"| {label} | " + " | ".join(
            f"{c['crash'][key][2]:.2f} s, {share(*c['crash'][key][:2])} from cache" for c in cells.values()) + " |")
    print("| crash: restored turn / warm turn | " + " | ".join(
        f"{c['crash']['after'][2] / c['crash']['warm'][2]:.2f}x (restore {c['crash']['restore'].get('seconds', 0):.3f} s,"
        f" {c['crash']['restore'].get('result')})" for c in cells.values()) + " |")
    for label, pick in (("parking: first turns", lambda rows: [r for r in rows if r.label.endswith(" 1")]),
                        ("parking: later turns", later_turns)):
        print(f"| {label} | " + " | ".join(
            f"{min(r.share for r in pick(c['parking'])):.0%}-{max(r.share for r in pick(c['parking'])):.0%} from cache, "
            f"ttft {min(r.ttft for r in pick(c['parking'])):.2f}-{max(r.ttft for r in pick(c['parking'])):.2f} s"
            for c in cells.values()) + " |")
    print("| parking: later turns' reasons | " + " | ".join(
        ", ".join(sorted({r.reason for r in later_turns(c["parking"])})) for c in cells.values()) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=FAMILIES)
    parser.add_argument("--turns", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.family or list(FAMILIES), args.turns))
