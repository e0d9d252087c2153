"""A llama-server run by hand (a backend of `url` and `kv_save_dir` only): a save goes back only into a
server that answers the probe as the one that wrote it (engines/fingerprint.py). On 5446c05 a default
server's save was restored into a `--rope-freq-base 5000` one: 631 tokens from cache, and garbage."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_kvsave_real import _usage, claude_turn

from orchestrator.backends.gateway import GATEWAY
from testkit.servers import LlamaServer

TURN = claude_turn("What is the capital of Italy? Answer with the city's name only.", max_tokens=8)
# Another conversation (its own key: its first user message differs), so each server's save is its own.
OTHER = claude_turn("What is the capital of France? Answer with the city's name only.", max_tokens=8)
OTHER["messages"][0] = {"role": "user", "content": [{"type": "text", "text": "A second project."}]}


async def _health(http, base) -> dict:
    async with http.get(base + "/health") as r:
        return (await r.json())["backends"][0]


async def _until(cond, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.1)


async def _restart(server: LlamaServer, http, base, restarts: int, *extra: str) -> dict:
    """Stop the server, wait for the gateway to see it down, start one on the same port with `extra`
    options, and wait for the gateway's restore (its /health view)."""
    server.stop()

    async def down() -> bool:
        return (await _health(http, base))["state"] != "ready"
    await _until(down)
    server.extra_args = extra
    await asyncio.to_thread(server.start)

    async def restored() -> bool:
        b = await _health(http, base)
        return b["state"] == "ready" and (b.get("kv_restore") or {}).get("time", 0) > restarts
    await _until(restored)
    return (await _health(http, base))["kv_restore"]


@pytest.mark.real
async def test_a_save_restores_only_into_a_server_that_answers_the_probe_alike(gateway, http, tmp_path):
    folder = tmp_path / "slots"
    folder.mkdir()
    server = LlamaServer(tmp_path, ("--slot-save-path", str(folder)))
    await asyncio.to_thread(server.start)
    try:
        base, app = await gateway({"backends": [{"name": "primary", "url": server.url, "kv_save_dir": str(folder),
                                                 "kv_save_idle_seconds": 0}]})
        gw = app[GATEWAY]
        saves = gw.metrics.registry

        def saved() -> float:
            return saves.get_sample_value("orchestrator_kv_saves_total", {"backend": "primary", "result": "saved"}) or 0

        async def health_ready() -> bool:
            return (await _health(http, base))["state"] == "ready"
        await _until(health_ready)
        probe = gw.backends["primary"].engine.probe
        assert probe and not probe.startswith("unknown:"), probe  # taken at the start, the slot empty

        first, _ = await _usage(http, base, TURN)
        await _until(lambda: asyncio.sleep(0, saved() >= 1))

        # Another rope base, same model, context and build: refused, and the turn is computed anew.
        t0 = time.time()
        restore = await _restart(server, http, base, t0, "--slot-save-path", str(folder), "--rope-freq-base", "5000")
        assert restore["result"] == "refused" and "probe" in restore["error"], restore
        usage, _ = await _usage(http, base, OTHER)
        assert usage.get("cache_read_input_tokens", 0) == 0, usage

        # The first settings again: of the two saves, the rope server's (newer) is refused in turn, and
        # the first server's, answering the probe alike, is restored.
        await _until(lambda: asyncio.sleep(0, saved() >= 2))
        t1 = time.time()
        restore = await _restart(server, http, base, t1, "--slot-save-path", str(folder))
        assert restore["result"] == "restored" and restore["n_tokens"] > 0, restore
        print(f"restore with the probe at the start took {restore['seconds']:.2f} s")
        usage, _ = await _usage(http, base, TURN)
        assert usage["cache_read_input_tokens"] > 0.9 * first["input_tokens"], (usage, first)
    finally:
        server.stop()
