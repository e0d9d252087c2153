"""KV persistence: saves that never overlap a generation, restores before the queue reopens,
saves from another server refused. A fake /slots here; the real llama-server under supervisord below."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.backends.health import State
from orchestrator.conversation import conversation_key
from orchestrator.kv import store as kvsave
from orchestrator.kv.results import RestoreResult, SaveResult
from orchestrator.kv.server_id import checksum
from orchestrator.ops import supervise
from testkit.client import post, sample
from testkit.engine import FakeEngine
from testkit.stack import Stack, wait_health

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
    gw.kv._bound(b.kv)  # another save's metadata step, meanwhile
    fake.slot_answer_gate.set()
    assert (await saving).result is SaveResult.SAVED
    leases[0].release()
    await _until(lambda: not b.kv.saving)
    assert _metric(gw, "orchestrator_kv_saves_total", backend="primary", result="saved") == 1
    files = [p.name for p in tmp_path.glob("*.bin")]
    assert [m["file"] for m in kvsave.saved_files(tmp_path)] == files and len(files) == 1


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


# ---- the real llama-server under supervisord ------------------------------------------------------

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
