"""Issue 26 on real models of each family beside the dense SmolLM2 (tests/real/test_kvsave_real.py,
test_real_parking.py): Gemma 3 270M, real weights, a sliding-window model (512 tokens on 15 of its
18 layers), and a tiny random-weight Qwen3.5 (deploy/install-hybrid-model.sh), a hybrid: Gated DeltaNet
layers with one full-attention layer in four.

- A crash: the supervised server, which the gateway runs with --swa-full, is killed (SEGV) after a
  warm turn; the same turn again reads >= 90% of its prompt from the restored save.
- Parking: three conversations taking turns on one slot with --cache-ram 0. With --swa-full their
  later turns read >= 90% from cache. Without it (a server the gateway does not run, whose options it
  cannot see) the restores read back little; the gateway measures that, turns its saves off after
  three, and every later miss says why (`restore_ineffective`), never `new`.

On the hybrid, llama.cpp cannot bring a chat's cache back from a save (a restore drops the context
checkpoints its next turn needs; engines/model_cache.py says why): with the prompt cache in RAM on
(llama-server's default) the gateway saves nothing and leaves switches to that cache, whose later
turns read >= 90% from it; with it off, the gateway measures the restores, as on Gemma without
--swa-full.

What each costs (time of a warm turn against a restored one) is bench/bench_model_families.py's.
Run with -s for the figures.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal

import aiohttp
import pytest

from testkit.client import sample
from testkit.models import gemma3_path, hybrid_path
from testkit.parking_session import ROLES, Bench, Conversation, gateway_config, later_turns, send, session, table
from testkit.stack import wait_health

pytestmark = pytest.mark.real

GOAL = 0.90


def claude_turn(text: str) -> dict:
    """Claude Code's real main request (its first three tools), a few tokens answered, not streamed."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["tools"], body["max_tokens"], body["stream"] = body["tools"][:3], 4, False
    body["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": text}]}
    return body


async def usage(http, url: str, body: dict) -> dict:
    async with http.post(url + "/v1/messages", json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:500]
    u = json.loads(raw)["usage"]
    return u | {"prompt": u["input_tokens"] + u["cache_read_input_tokens"]}


async def crash(s, http) -> None:
    """kill -SEGV the supervised server, and wait until the gateway sees it gone or already restarted
    (supervisord may bring it back before a poll of /health sees it down). The bound: a hung gateway."""
    before = (await wait_health(http, s.url))["backends"][0]["restarts"]
    os.kill(s.pid("llama-primary"), signal.SIGSEGV)
    async with asyncio.timeout(300):
        while True:
            b = (await wait_health(http, s.url))["backends"][0]
            if b["state"] != "ready" or b["restarts"] > before:
                return
            await asyncio.sleep(0.02)


async def test_a_crash_costs_a_restore_on_a_sliding_window_model(stack, http):
    s = stack(model=gemma3_path(), ctx_size=8192, settings="kv_save_idle_seconds = 0.5")
    s.up()
    assert "--swa-full" in s.paths.conf.read_text()  # the gateway put it on the supervised command
    b = await s.ready(http)
    model = b["model_cache"]
    assert (model["kind"], model["arch"], model["restorable"], model["swa_full_added"]) == (
        "sliding_window", "gemma3", True, True)
    assert model["swa_full_bytes"] == 105 * 2 ** 20 and b["kv_saves"]["on"], b
    body = claude_turn("First turn: say hi.")
    cold = await usage(http, s.url, body)
    assert cold["prompt"] > 1000 and cold["cache_read_input_tokens"] < 0.1 * cold["prompt"], cold
    warm = await usage(http, s.url, body)
    assert warm["cache_read_input_tokens"] >= GOAL * warm["prompt"], warm  # its own checkpoints, no crash
    async with asyncio.timeout(60):  # the idle save
        while await s.metric(http, 'orchestrator_kv_saves_total{backend="primary",result="saved"}') < 1:
            await asyncio.sleep(0.1)
    await crash(s, http)
    after = await usage(http, s.url, body)  # queued while the server restarts; restored before it is sent
    restore = (await s.ready(http, restarts=1))["kv_restore"]
    print(f"\nGemma 3 270M crash: cold {cold}, warm {warm}, after SEGV {after}, restore {restore}")
    assert restore["result"] == "restored" and restore["n_tokens"] >= cold["prompt"], restore
    assert after["cache_read_input_tokens"] >= GOAL * after["prompt"], after


async def test_a_busy_session_on_a_sliding_window_model_is_checkpointed_and_a_crash_costs_a_restore(stack, http):
    """No idle moment for the idle save (a tool loop, streamed): the session is saved before its next
    turn (a checkpoint), and after a crash its next turn reads the checkpoint back."""
    s = stack(model=gemma3_path(), ctx_size=8192, settings="kv_save_idle_seconds = 3600")
    s.up()
    await s.ready(http)
    body = {**claude_turn("First turn: say hi."), "stream": True}
    await send(http, s.url, body)
    body["messages"] += [{"role": "assistant", "content": "Hi."},
                         {"role": "user", "content": "Second turn: say hi again."}]
    await send(http, s.url, body)  # checkpointed before it was sent
    checkpoint = 'orchestrator_kv_parks_total{action="checkpoint",backend="primary",result="ok"}'
    assert await s.metric(http, checkpoint) == 1
    await crash(s, http)
    body["messages"] += [{"role": "assistant", "content": "Hi again."}, {"role": "user", "content": "Third turn."}]
    prompt, cached, *_ = await send(http, s.url, body)
    restore = (await s.ready(http, restarts=1))["kv_restore"]
    print(f"\nGemma 3 270M, a busy session: after SEGV {cached}/{prompt} from cache, restore {restore}")
    assert restore["result"] == "restored", restore
    assert cached >= GOAL * prompt, (cached, prompt)


async def test_parked_conversations_on_a_sliding_window_model_read_their_later_turns_from_cache(tmp_path):
    bench = Bench(tmp_path, gemma3_path())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
            parked = await bench.one_server(http, 2, True, "--cache-ram", "0", "--swa-full")
    finally:
        await bench.close()
    print("\n" + "\n".join(table({"Gemma 3 270M, --swa-full, parked": parked})))
    assert all(r.share >= GOAL for r in later_turns(parked)), [(r.label, r.share) for r in parked]
    assert all(r.reason == "unparked" for r in later_turns(parked))


@pytest.mark.parametrize("family", ["sliding_window", "hybrid"])
async def test_where_restores_bring_nothing_back_the_gateway_sees_it_and_stops_saving(tmp_path, family):
    """A server the gateway does not run (its options unknown), --cache-ram 0: Gemma without --swa-full,
    and the hybrid."""
    bench = Bench(tmp_path, {"sliding_window": gemma3_path, "hybrid": hybrid_path}[family]())
    slots = tmp_path / "slots"
    slots.mkdir()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
            server = bench.server("--cache-ram", "0", slots_folder=slots)
            base, app = await bench.gateway(gateway_config(server.url, slots, True))
            rows = await session(http, {n: base for n in ROLES}, {n: app for n in ROLES}, 3)
            health = (await wait_health(http, base))["backends"][0]
    finally:
        await bench.close()
    print("\n" + "\n".join(table({f"{family}, --cache-ram 0, no flags, parked": rows})))
    later = later_turns(rows)
    # Its options are not the gateway's to see (not supervised): whether a restore works is measured.
    assert health["model_cache"]["kind"] == family and health["model_cache"]["restorable"] is None
    # The first three unparks read back under half of what they restored: counted, then saves go off.
    assert [r.reason for r in later[:3]] == ["restore_ineffective"] * 3, [(r.label, r.reason) for r in rows]
    assert all(r.share < 0.5 for r in later[:3]), [(r.label, r.share) for r in rows]
    assert not health["kv_saves"]["on"] and "3 restores in a row" in health["kv_saves"]["off_because"], health
    # Later switches park and unpark nothing, and still say why their prompt was computed.
    assert [(r.reason, r.parking) for r in later[3:]] == [("restore_ineffective", 0.0)] * 3, rows


async def test_a_hybrid_model_leaves_switches_to_its_ram_cache_and_saves_nothing(stack, http):
    s = stack(model=hybrid_path(), ctx_size=8192, settings="kv_save_idle_seconds = 0.5")
    s.up()
    b = await s.ready(http)
    model = b["model_cache"]
    assert (model["kind"], model["arch"], model["restorable"]) == ("hybrid", "qwen35", False), model
    assert not b["kv_saves"]["on"] and b["kv_saves"]["off_because"] == model["why"]
    convs = [Conversation(i, name) for i, name in enumerate(ROLES)]
    answers: dict[str, str | None] = {c.name: None for c in convs}
    rows = []
    for _ in range(2):
        for c in convs:
            prompt, cached, _, _, answers[c.name] = await send(http, s.url, c.next(answers[c.name]))
            rows.append((f"{c.name} {c.turns}", prompt, cached))
    recent = (await s.backend(http))["cache"]["recent"]
    print(f"\nhybrid, prompt cache in RAM, saves off: {rows}; reasons {[t['reason'] for t in recent]}")
    # The later turns came back to a slot another conversation had held: llama-server's RAM cache
    # (which keeps the context checkpoints) served them, with no save and no restore by the gateway.
    assert all(cached >= GOAL * prompt for _, prompt, cached in rows[3:]), rows
    assert [t["reason"] for t in recent[-3:]] == ["hit"] * 3 and all(not t["slot_seconds"] for t in recent)
    # A crash empties that cache: the next turn computes its prompt, and says why.
    await crash(s, http)
    main = convs[0]
    await send(http, s.url, main.next(answers[main.name]))
    b = await s.ready(http, restarts=1)
    assert b["cache"]["recent"][-1]["reason"] == "restore_ineffective", b["cache"]["recent"]
    async with http.get(s.url + "/metrics") as r:  # no save was ever made
        saved = [line for line in (await r.text()).splitlines()
                 if line.startswith("orchestrator_kv_saves_total{") and 'result="saved"' in line]
    assert all(line.endswith(" 0.0") for line in saved), saved
    assert not any(s.slots.glob("*.bin"))
