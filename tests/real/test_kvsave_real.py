"""KV persistence with the real llama-server under supervisord: the queued turn after a kill -SEGV reads
its prompt from the restored cache, `down` saves and `up` restores, and a save from another context size or
rope base, or overwritten in place, is refused (the fake /slots: test_kvsave)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import time

import pytest

from orchestrator.kv.server_id import checksum
from orchestrator.ops import supervise
from testkit.client import sample
from testkit.stack import Stack, wait_health

def claude_turn(text: str, max_tokens: int = 4) -> dict:
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["tools"], body["max_tokens"], body["stream"] = body["tools"][:3], max_tokens, False
    body["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": text}]}
    return body


def real_stack(stack_factory, kv: bool = True) -> Stack:
    s = stack_factory()
    text = s.config_path.read_text().replace("--ctx-size 4096", "--ctx-size 8192")
    text += f"kv_save = {'true' if kv else 'false'}\nkv_save_idle_seconds = 0.5\n"
    s.config_path.write_text(text)
    from orchestrator.configfile import load_config
    s.config = load_config(s.config_path)
    return s


async def _usage(http, url, body) -> tuple[dict, float]:
    t0 = time.monotonic()
    async with http.post(url + "/v1/messages", json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:500]
    return json.loads(raw)["usage"], time.monotonic() - t0


async def _ready_after_restart(http, url, restarts: int) -> dict:
    async with asyncio.timeout(60):
        while True:
            b = (await wait_health(http, url))["backends"][0]
            if b["restarts"] >= restarts and b["state"] == "ready":
                return b
            await asyncio.sleep(0.1)


async def _crash_with_a_queued_turn(s: Stack, http, body) -> tuple[dict, float, float]:
    """kill -SEGV llama-server, queue the next turn while it restarts; its usage, latency, and when sent."""
    llama_pid = s.pid("llama-primary")
    os.kill(llama_pid, signal.SIGSEGV)
    async with asyncio.timeout(20):
        while (await wait_health(http, s.url))["backends"][0]["state"] == "ready":
            await asyncio.sleep(0.02)
    sent = time.time()
    usage, took = await _usage(http, s.url, body)
    return usage, took, sent


@pytest.mark.real
async def test_after_segv_the_queued_turn_reads_its_prompt_from_the_restored_cache(stack, http):  # noqa: F811
    s = real_stack(stack)
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    cold, cold_s = await _usage(http, s.url, claude_turn("First turn: say hi."))
    total = cold["input_tokens"] + cold["cache_read_input_tokens"]
    assert total > 1000 and cold["cache_read_input_tokens"] < 0.1 * total
    _, warm_s = await _usage(http, s.url, claude_turn("First turn: say hi."))
    # The save follows the idle moment (0.5 s here).
    async with asyncio.timeout(30):
        while await s.metric(http, 'orchestrator_kv_saves_total{backend="primary",result="saved"}') < 1:
            await asyncio.sleep(0.1)
    slot_dir = s.paths.slots(s.config.backends[0])
    meta = json.loads(next(slot_dir.glob("*.json")).read_text())
    assert meta["n_tokens"] >= total and meta["bytes"] > 1_000_000

    usage, after_s, _ = await _crash_with_a_queued_turn(s, http, claude_turn("First turn: say hi."))
    after_total = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] > 0.8 * after_total, usage
    health = (await wait_health(http, s.url))["backends"][0]
    restore = health["kv_restore"]
    assert restore["result"] == "restored" and restore["n_tokens"] >= total
    # The restore ran before the queued turn was sent: the gateway logged it first.
    log_text = s.paths.log("gateway").read_text()
    restored_at = log_text.rfind("restored ")
    answered_at = log_text.rfind("main primary 200")
    assert 0 <= restored_at < answered_at, log_text[-3000:]
    print(f"\nKV figures: cold {cold_s:.2f}s, warm {warm_s:.2f}s, after SEGV+restore {after_s:.2f}s "
          f"(restore {restore['seconds']:.3f}s, {restore['n_tokens']} tokens, file {meta['bytes']:,} bytes); "
          f"prompt {after_total} tokens, {usage['cache_read_input_tokens']} read from cache")


@pytest.mark.real
async def test_after_segv_without_kv_save_the_turn_is_cold(stack, http):  # noqa: F811
    s = real_stack(stack, kv=False)
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    await _usage(http, s.url, claude_turn("First turn: say hi."))
    usage, after_s, _ = await _crash_with_a_queued_turn(s, http, claude_turn("First turn: say hi."))
    total = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] < 0.1 * total
    assert "--slot-save-path" not in s.paths.conf.read_text()
    print(f"\nKV figures: after SEGV without restore {after_s:.2f}s, {usage['cache_read_input_tokens']} of "
          f"{total} tokens from cache")


@pytest.mark.real
async def test_a_save_from_another_context_size_is_refused_by_the_real_stack(stack, http):  # noqa: F811
    s = real_stack(stack)
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    await _usage(http, s.url, claude_turn("First turn: say hi."))
    async with asyncio.timeout(30):
        while await s.metric(http, 'orchestrator_kv_saves_total{backend="primary",result="saved"}') < 1:
            await asyncio.sleep(0.1)
    meta_path = next(s.paths.slots(s.config.backends[0]).glob("*.json"))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n_ctx": 65536}))
    usage, _, _ = await _crash_with_a_queued_turn(s, http, claude_turn("First turn: say hi."))
    assert usage["cache_read_input_tokens"] < 0.1 * (usage["input_tokens"] + usage["cache_read_input_tokens"])
    restore = (await wait_health(http, s.url))["backends"][0]["kv_restore"]
    assert restore["result"] == "refused" and "65536" in restore["error"]
    warnings = [line for line in s.paths.log("gateway").read_text().splitlines() if "KV save refused" in line]
    assert len(warnings) == 1


@pytest.mark.real
async def test_down_saves_and_the_next_up_restores(stack, http):  # noqa: F811
    """`make down` then `make up`: no idle save (the idle time is long), only the one at shutdown."""
    s = real_stack(stack)
    s.config_path.write_text(s.config_path.read_text().replace("kv_save_idle_seconds = 0.5",
                                                               "kv_save_idle_seconds = 600"))
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    await _usage(http, s.url, claude_turn("First turn: say hi."))
    slot_dir = s.paths.slots(s.config.backends[0])
    assert not list(slot_dir.glob("*.json"))
    assert await asyncio.to_thread(supervise.down, s.paths)
    assert len(list(slot_dir.glob("*.json"))) == 1  # saved by the gateway as it stopped, before llama-server
    assert await asyncio.to_thread(s.up) == "started"
    await wait_health(http, s.url)
    usage, _ = await _usage(http, s.url, claude_turn("First turn: say hi."))
    total = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] > 0.8 * total, usage
    assert (await wait_health(http, s.url))["backends"][0]["kv_restore"]["result"] == "restored"


async def _answer(http, url, body) -> tuple[str, dict]:
    async with http.post(url + "/v1/messages", json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:500]
    msg = json.loads(raw)
    return "".join(b.get("text", "") for b in msg["content"]), msg["usage"]


async def _saved(s: Stack, http) -> dict:
    async with asyncio.timeout(30):
        while await s.metric(http, 'orchestrator_kv_saves_total{backend="primary",result="saved"}') < 1:
            await asyncio.sleep(0.1)
    return json.loads(next(s.paths.slots(s.config.backends[0]).glob("*.json")).read_text())


@pytest.mark.real
async def test_a_save_overwritten_in_place_is_refused_and_the_server_answers_cold_and_right(stack, http):  # noqa: F811
    s = real_stack(stack)
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    turn = {**claude_turn("First turn: say hi.", max_tokens=8), "temperature": 0}
    right, _ = await _answer(http, s.url, turn)
    meta = await _saved(s, http)
    save = s.paths.slots(s.config.backends[0]) / meta["file"]
    t0 = time.monotonic()
    digest = checksum(save)
    per_gb = (time.monotonic() - t0) / (meta["bytes"] / 1e9)
    # Zero 16 KiB of KV data in place, the size unchanged, inside a layer's tensor (the file's halfway
    # point is the boundary between its K and V tensors): its structure (token ids, each tensor's
    # header) intact, so llama-server itself takes it (the unchecked gateway got `restored`).
    with open(save, "r+b") as f:
        f.seek(meta["bytes"] * 5 // 8)
        f.write(bytes(16 * 1024))
    assert save.stat().st_size == meta["bytes"]
    llama_pid = s.pid("llama-primary")
    os.kill(llama_pid, signal.SIGSEGV)
    async with asyncio.timeout(20):
        while (await wait_health(http, s.url))["backends"][0]["state"] == "ready":
            await asyncio.sleep(0.02)
    text, usage = await _answer(http, s.url, turn)
    restore = (await wait_health(http, s.url))["backends"][0]["kv_restore"]
    assert restore["result"] == "failed" and "checksum" in restore["error"], restore
    assert usage["cache_read_input_tokens"] < 0.1 * (usage["input_tokens"] + usage["cache_read_input_tokens"])
    assert text == right
    assert digest == meta.get("sha256")
    print(f"\nKV checksum: {meta['bytes']:,} bytes hashed at {per_gb:.2f} s per GB")


@pytest.mark.real
async def test_a_save_from_another_rope_freq_base_is_refused_by_the_real_stack(stack, http):  # noqa: F811
    """Same model path, context size and build; another --rope-freq-base: the KV means something else."""
    s = real_stack(stack)
    s.up()
    await wait_health(http, s.url)
    await _ready_after_restart(http, s.url, 0)
    turn = {**claude_turn("First turn: say hi.", max_tokens=8), "temperature": 0}
    await _answer(http, s.url, turn)
    await _saved(s, http)
    assert await asyncio.to_thread(supervise.down, s.paths)
    s.config_path.write_text(s.config_path.read_text().replace("--ctx-size 8192",
                                                               "--ctx-size 8192 --rope-freq-base 20000"))
    from orchestrator.configfile import load_config
    s.config = load_config(s.config_path)
    assert await asyncio.to_thread(s.up) == "started"
    await wait_health(http, s.url)
    _, usage = await _answer(http, s.url, turn)
    restore = (await wait_health(http, s.url))["backends"][0]["kv_restore"]
    assert restore["result"] == "refused" and "--rope-freq-base 20000" in restore["error"], restore
    assert usage["cache_read_input_tokens"] < 0.1 * (usage["input_tokens"] + usage["cache_read_input_tokens"])
