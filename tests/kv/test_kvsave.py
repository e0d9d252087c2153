"""KV persistence: saves that never overlap a generation, restores before the queue reopens,
saves from another server refused. A fake /slots here; the real llama-server under supervisord in
test_kvsave_real."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.backends.health import State
from orchestrator.conversation import conversation_key
from orchestrator.kv import folder as kv_folder
from orchestrator.kv import store as kvsave
from orchestrator.kv.results import RestoreResult, SaveResult
from testkit.client import post, sample
from testkit.engine import FakeEngine

PROPS = {"model_path": "/models/m.gguf", "build_info": "b1-abc", "default_generation_settings": {"n_ctx": 4096}}


def slot_engine(folder: Path, **kw) -> FakeEngine:
    """The fake engine with llama-server's slot actions (saving into `folder`) and /props."""
    return FakeEngine(folder=folder, props=dict(PROPS), slot_tokens=0, **kw)


def main_body(first: str = "hello", turn: int = 0, cch: str = "aa") -> dict:
    return {"model": "m", "max_tokens": 5, "system": [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.332.{cch};"},
        {"type": "text", "text": "You are helpful."}],
        "messages": [{"role": "user", "content": first}] + [{"role": "user", "content": f"turn {turn}"}] * turn}


@pytest.fixture
async def kv_stack(serve_app, gateway, tmp_path):
    async def make(idle: float = 0.0, max_bytes: int = 10 ** 9, fake=None, folder=None, **fake_kw):
        folder = folder or tmp_path
        fake = fake or slot_engine(folder, **fake_kw)
        url = await serve_app(fake.app())
        base, app = await gateway({"backends": [{"name": "primary", "url": url, "kv_save_dir": str(folder),
                                                 "kv_save_idle_seconds": idle, "kv_save_max_bytes": max_bytes}]})
        gw = app[GATEWAY]
        await _until(lambda: gw.backends["primary"].health.state is State.READY)
        return fake, base, gw
    return make


async def _until(cond, timeout: float = 30.0) -> None:  # polled: the bound only for what never comes
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def _metric(gw, name: str, **labels) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


# ---- the prefix key ---------------------------------------------------------------------------

def test_conversation_key_ignores_the_billing_line_and_later_turns():
    assert conversation_key(main_body(cch="aa")) == conversation_key(main_body(cch="bb", turn=3))
    assert conversation_key(main_body("hello")) != conversation_key(main_body("other"))
    real = sample("main-2.1.332.json")["body"]
    assert len(conversation_key(real)) == 32


def test_render_adds_a_slot_save_folder_to_supervised_servers_only(tmp_path):
    from orchestrator.configfile import config_from_dict
    from orchestrator.ops import supervise

    config = config_from_dict({"backends": [
        {"name": "primary", "url": "http://127.0.0.1:8080", "command": "{llama_server} --port {port}"},
        {"name": "own", "url": "http://127.0.0.1:8081", "command": "x --slot-save-path /mine", "role": "main"},
        {"name": "off", "url": "http://127.0.0.1:8082", "command": "y", "kv_save": False}]})
    text = supervise.render(config, tmp_path / "o.toml", supervise.StackPaths(tmp_path), supervise.Programs("/ls"))
    assert f"--port 8080 --slot-save-path {tmp_path}/var/slots/primary" in text
    assert text.count("--slot-save-path") == 2  # "own" keeps its own; "off" gets none


def test_the_server_identity_covers_what_changes_the_kv(tmp_path):
    from orchestrator.engines.base import ServerId
    from orchestrator.engines.llama_server import file_identity, kv_args

    line = ("{llama_server} --model m.gguf --port {port} --rope-freq-base 20000 -ctk q8_0 --threads 2 "
            "--lora-scaled a.gguf 0.5 --flash-attn on --rope-scaling=yarn --no-webui")
    assert kv_args(line) == ("--rope-freq-base 20000 -ctk q8_0 --lora-scaled a.gguf 0.5 --flash-attn on "
                             "--rope-scaling=yarn")
    assert kv_args("{llama_server} --model m.gguf --threads 4") == ""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    before = file_identity(str(model))
    os.utime(model, ns=(1, 2))
    assert before.startswith("10:") and file_identity(str(model)) == "10:2" and file_identity("/nonexistent") == ""
    a = ServerId("m.gguf", 4096, "b1", "10:2", "--rope-freq-base 10000")
    b = ServerId("m.gguf", 4096, "b1", "10:2", "--rope-freq-base 20000")
    assert a.mismatch(a.fields()) == "" and "rope-freq-base 20000" in b.mismatch(a.fields())
    # A save written before these were recorded fits no server: refused once, then saved anew.
    assert a.mismatch({"model": "m.gguf", "n_ctx": 4096, "build": "b1"})


def test_status_says_what_the_last_restore_spared():
    from orchestrator.ops.status import kv_lines

    at = time.mktime((2030, 1, 2, 14, 2, 0, 0, 0, -1))
    health = {"backends": [{"name": "primary", "kv_restore": {"result": "restored", "n_tokens": 4170, "seconds": 0.012,
                                                              "time": at}},
                           {"name": "other", "kv_restore": {"result": "refused", "time": at, "error": "n_ctx 1"}},
                           {"name": "new", "kv_restore": {"result": "none", "time": at}}]}
    assert kv_lines(health, at) == ["kv cache: primary restored 4,170 tokens in 0.01 s after the restart at 14:02:00",
                                    "kv cache: other started cold after the restart at 14:02:00 (refused: n_ctx 1)"]


# ---- saving -----------------------------------------------------------------------------------

async def test_save_after_a_main_request_then_unchanged_is_skipped(kv_stack, http, tmp_path):
    fake, base, gw = await kv_stack()
    assert (await post(http, base, main_body()))[0] == 200
    await _until(lambda: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == 1)
    key = conversation_key(main_body())
    meta = json.loads((tmp_path / f"{key}.json").read_text())
    assert meta["model"] == "/models/m.gguf" and meta["n_ctx"] == 4096 and meta["build"] == "b1-abc"
    assert meta["bytes"] == 1000 and meta["n_tokens"] == 123 and (tmp_path / meta["file"]).exists()
    assert await gw.kv.save(gw.backends["primary"].kv) is SaveResult.UNCHANGED
    # The next turn of the same conversation (more tokens) replaces its save.
    fake.parts = 7
    assert (await post(http, base, main_body(turn=1)))[0] == 200
    await _until(lambda: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == 2)
    assert len(list(tmp_path.glob("*.bin"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert _metric(gw, "orchestrator_kv_save_seconds_count", backend="primary") == 2


async def test_byte_bound_drops_the_oldest_save(kv_stack, http, tmp_path):
    _, base, gw = await kv_stack(max_bytes=2500)
    for i, first in enumerate(("one", "two", "three")):
        assert (await post(http, base, main_body(first)))[0] == 200
        await _until(lambda i=i: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == i + 1)
        await asyncio.sleep(0.01)
    kept = {json.loads(p.read_text())["key"] for p in tmp_path.glob("*.json")}
    assert kept == {conversation_key(main_body("two")), conversation_key(main_body("three"))}
    assert len(list(tmp_path.glob("*.bin"))) == 2
    assert _metric(gw, "orchestrator_kv_disk_bytes", backend="primary") == 2000


async def test_a_file_the_server_is_writing_is_not_swept_by_another_saves_bound(kv_stack, http, tmp_path):
    """The folder's bound drops files no save names; one the server has written but not yet answered
    for is on its way to being named. Found as a flake of test_parking under load: a park's checksum,
    run beside the next park, swept that park's file away."""
    # The save's answer waits for the gate; the file is on disk before it.
    fake = slot_engine(tmp_path, slot_answer_gate=asyncio.Event())
    _, base, gw = await kv_stack(idle=3600, fake=fake)
    assert (await post(http, base, main_body("one")))[0] == 200
    b = gw.backends["primary"]
    conversation, tokens = b.kv.latest
    leases = [b.queue.try_acquire()]  # as a park does: the caller holds the slot
    saving = asyncio.ensure_future(gw.kv.save_held(b.kv, conversation, tokens))
    await _until(lambda: list(tmp_path.glob("*.bin")))
    kv_folder.scan(tmp_path, b.kv.pending)  # a scan of the folder (a gateway starting), meanwhile
    fake.slot_answer_gate.set()
    assert (await saving).result is SaveResult.SAVED
    leases[0].release()
    await _until(lambda: not b.kv.saving)
    assert _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == 1
    files = [p.name for p in tmp_path.glob("*.bin")]
    assert [k.file for k in kv_folder.scan(tmp_path, set())] == files and len(files) == 1


async def test_a_save_never_overlaps_a_generation_nor_delays_a_waiting_request(kv_stack, http):
    fake, base, gw = await kv_stack(idle=0.0, chunk_delay=0.002)
    fake.save_delay = 0.05
    # A busy loop: each request follows the last at once, some in parallel.
    for round_ in range(6):
        results = await asyncio.gather(*[post(http, base, main_body(f"c{i}", turn=round_)) for i in range(3)])
        assert all(s == 200 for s, *_ in results)
        await asyncio.sleep(0.03 * (round_ % 3))  # sometimes a save starts, sometimes not
    # The idle save after the last round: waited for, not given 0.2 s.
    await _until(lambda: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") >= 1)
    assert not fake.crashed and fake.max_in_flight == 1
    assert [a for a, _ in fake.actions].count("save") >= 1
    saves = _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved")
    busy = _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="busy")
    assert saves >= 1 and saves + busy >= 1


async def test_a_failed_save_is_counted_and_the_backend_goes_on(kv_stack, http, tmp_path, caplog):
    fake, base, gw = await kv_stack()
    fake.props = None  # /props answers null: nothing identifies the server
    assert (await post(http, base, main_body()))[0] == 200
    await _until(lambda: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="failed") == 1)
    assert (await post(http, base, main_body(turn=1)))[0] == 200
    assert not list(tmp_path.glob("*.bin"))


# ---- restoring --------------------------------------------------------------------------------

async def _saved_conversations(kv_stack, http, tmp_path, *firsts):
    fake, base, gw = await kv_stack()
    for i, first in enumerate(firsts):
        assert (await post(http, base, main_body(first)))[0] == 200
        await _until(lambda i=i: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == i + 1)
        await asyncio.sleep(0.01)
    return fake, base, gw


async def _crash_and_queue(fake, base, gw, http, body):
    """The backend goes down (its slot empty), a request waits, the backend comes back."""
    health = gw.backends["primary"].health
    fake.slot_tokens, fake.loading = 0, True
    health.mark_down("test crash")
    request = asyncio.create_task(post(http, base, body))
    await _until(lambda: gw.backends["primary"].queue.depth == 1)
    fake.loading = False
    health.poke()
    return await request


async def test_restore_picks_the_first_waiters_conversation_before_the_queue_opens(kv_stack, http, tmp_path):
    fake, base, gw = await _saved_conversations(kv_stack, http, tmp_path, "one", "two")
    fake.actions.clear()
    n = fake.generations_started
    status, *_ = await _crash_and_queue(fake, base, gw, http, main_body("one", turn=2))
    assert status == 200
    restores = [name for action, name in fake.actions if action == "restore"]
    assert len(restores) == 1 and restores[0].startswith(conversation_key(main_body("one")))
    assert fake.generations_started == n + 1 and not fake.crashed  # the restore came first
    note = gw.backends["primary"].health.snapshot()["kv_restore"]
    assert note["result"] == "restored" and note["n_tokens"] == 123
    assert _metric(gw, "orchestrator_kv_restored_tokens_total", backend="primary") == 123


async def test_restore_without_a_waiter_takes_the_newest_and_a_warm_slot_is_left_alone(kv_stack, http, tmp_path):
    fake, _, gw = await _saved_conversations(kv_stack, http, tmp_path, "one", "two")
    fake.actions.clear()
    fake.slot_tokens = 0
    gw.backends["primary"].health.mark_down("test crash")
    gw.backends["primary"].health.poke()
    await _until(lambda: gw.backends["primary"].health.state is State.READY)
    assert fake.actions[-1][1].startswith(conversation_key(main_body("two")))
    fake.actions.clear()
    fake.slot_tokens = 500  # the server kept its cache (only the connection failed)
    gw.backends["primary"].health.mark_down("blip")
    gw.backends["primary"].health.poke()
    await _until(lambda: gw.backends["primary"].health.state is State.READY)
    assert not fake.actions and _metric(gw, "orchestrator_kv_restores_total", backend="primary", result="warm") == 1


async def test_a_save_from_another_model_is_refused_with_one_warning(kv_stack, http, tmp_path, caplog):
    fake, base, gw = await _saved_conversations(kv_stack, http, tmp_path, "one")
    fake.actions.clear()
    fake.props = {**PROPS, "model_path": "/models/other.gguf"}
    with caplog.at_level(logging.WARNING, logger="orchestrator.kv.store"):
        status, *_ = await _crash_and_queue(fake, base, gw, http, main_body("one", turn=1))
    assert status == 200 and not [a for a in fake.actions if a[0] == "restore"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0] and "other.gguf" in warnings[0], warnings
    assert _metric(gw, "orchestrator_kv_restores_total", backend="primary", result="refused") == 1


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "garbage_meta", "server_refuses"])
async def test_a_corrupt_save_means_cold_never_down(kv_stack, http, tmp_path, damage):
    fake, base, gw = await _saved_conversations(kv_stack, http, tmp_path, "one")
    meta_path = next(tmp_path.glob("*.json"))
    if damage == "truncated":
        (tmp_path / json.loads(meta_path.read_text())["file"]).write_bytes(b"k" * 10)
    elif damage == "overwritten":
        # The same size, other bytes: llama-server would restore it and answer garbage.
        save = tmp_path / json.loads(meta_path.read_text())["file"]
        save.write_bytes(save.read_bytes()[:500] + b"X" * 500)
        fake.actions.clear()
    elif damage == "garbage_meta":
        meta_path.write_text("{not json")
    else:
        fake.restore_error = "Unable to restore slot: Invalid tokens in slot save file"
    result = "none" if damage == "garbage_meta" else "failed"
    before = _metric(gw, "orchestrator_kv_restores_total", backend="primary", result=result)
    status, *_ = await _crash_and_queue(fake, base, gw, http, main_body("one", turn=1))
    assert status == 200
    assert _metric(gw, "orchestrator_kv_restores_total", backend="primary", result=result) == before + 1
    if damage == "overwritten":
        assert not [a for a in fake.actions if a[0] == "restore"]  # never sent to the server
        assert not list(tmp_path.glob("*.json"))  # the damaged save is gone; the next turn saves anew


async def test_metadata_not_written_here_can_neither_delete_outside_nor_lift_the_bound(kv_stack, http, tmp_path):
    """A `.json` planted in the save folder (or left by an older, buggy writer) names a file outside
    the folder and a negative size: the gateway follows neither."""
    folder = tmp_path / "slots"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    key = conversation_key(main_body("one"))
    (folder / f"{key}.json").write_text(json.dumps(
        {"key": key, "file": "../victim.txt", "bytes": 10, "time": time.time(), "slot": 0, **_ids()}))
    other = "f" * 32
    (folder / f"{other}.json").write_text(json.dumps(
        {"key": other, "file": f"{other}-1.bin", "bytes": -10 ** 12, "time": time.time() + 3600, "slot": 0,
         **_ids()}))
    (folder / f"{other}-1.bin").write_bytes(b"k" * 10)
    fake = slot_engine(folder)
    _, base, gw = await _kv_gateway(kv_stack, fake, folder, max_bytes=2500)
    for i, first in enumerate(("one", "two", "three")):
        assert (await post(http, base, main_body(first)))[0] == 200
        await _until(lambda i=i: _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == i + 1)
        await asyncio.sleep(0.01)
    assert victim.read_text() == "keep me"
    # The budget holds: two saves of 1000 bytes, the planted negative size counted for nothing.
    assert len(list(folder.glob("*.bin"))) == 2
    assert _metric(gw, "orchestrator_kv_disk_bytes", backend="primary") == 2000


def _ids() -> dict:
    return {"model": PROPS["model_path"], "n_ctx": 4096, "build": PROPS["build_info"]}


async def _kv_gateway(kv_stack, fake, folder, **kw):
    return await kv_stack(fake=fake, folder=folder, **kw)


async def test_restore_is_bounded_and_never_raises(tmp_path):
    """A server that never answers the restore: the backend opens cold after the bound."""
    from prometheus_client import CollectorRegistry

    from orchestrator.configfile import config_from_dict
    from orchestrator.engines.llama_server import LlamaServer
    from orchestrator.metrics import Metrics
    from orchestrator.slots import SlotQueue

    config = config_from_dict({"backends": [{"name": "p", "url": "http://127.0.0.1:9", "kv_save_dir": str(tmp_path)}]})

    class Stuck:
        async def get_json(self, *a, **k):
            await asyncio.sleep(3600)

    kv = kvsave.KvPersistence(config, Metrics(CollectorRegistry(), ["p"]))
    saves = kv.attach(LlamaServer(config.backends[0], Stuck()), SlotQueue("p", 1))
    old = kvsave.RESTORE_TIMEOUT
    kvsave.RESTORE_TIMEOUT = 0.1
    try:
        done = await kv.restore(saves)
    finally:
        kvsave.RESTORE_TIMEOUT = old
    assert done.result is RestoreResult.FAILED
