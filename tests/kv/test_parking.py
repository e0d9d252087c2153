"""Parking (issue 19): the slot's conversation saved before another takes the slot, the incoming one
restored, a busy one checkpointed; never beside a generation, cold (never wrong) when it fails.
A fake llama-server that records its /slots actions and crashes on any overlap; the real one in
tests/test_real_parking.py."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from test_kvsave import _crash_and_queue, _metric, _until, main_body, slot_engine

from orchestrator import conversation as prefixes
from orchestrator.backends.gateway import GATEWAY
from orchestrator.backends.health import State
from orchestrator.conversation import Conversation, conversation_key
from orchestrator.kv import folder as kv_folder
from orchestrator.kv.cachemiss import CacheMisses, ServedTurn
from orchestrator.kv.parking import SlotFound
from orchestrator.metrics import Metrics
from testkit.client import post


def parking_engine(folder, **kw):
    """Like llama-server: the slot holds the last prompt (100 tokens after any turn); a restore, like a
    save, is slot work that must never overlap a generation; `die_on` closes the connection
    mid-action, like a crash. Every answer here counts 18 tokens (10 + 3 cached + 5 out); a real
    conversation grows by a turn, so what a restore brings back (10) is less than the slot holds
    after the next turn."""
    return slot_engine(folder, tokens_per_turn=100, restored_tokens=10, **kw)


@pytest.fixture
async def park_stack(serve_app, gateway, tmp_path):
    async def make(**backend_keys):
        fake = parking_engine(tmp_path)
        url = await serve_app(fake.app())
        base, app = await gateway({"backends": [{
            "name": "primary", "url": url, "kv_save_dir": str(tmp_path), "kv_park_min_tokens": 0,
            # No idle save in the way: what is saved here, parking saved.
            "kv_save_idle_seconds": 3600, **backend_keys}]})
        gw = app[GATEWAY]
        await _until(lambda: gw.backends["primary"].health.state is State.READY)
        return fake, base, gw
    return make


def _key(first: str) -> str:
    return conversation_key(main_body(first))


def _actions(fake) -> list[tuple[str, str]]:
    return [(a, name.split("-")[0][:8]) for a, name in fake.actions]


async def test_a_switch_parks_the_outgoing_conversation_and_unparks_the_incoming(park_stack, http):
    fake, base, gw = await park_stack()
    for first, turn in (("one", 0), ("two", 0), ("one", 1), ("two", 1)):
        assert (await post(http, base, main_body(first, turn=turn)))[0] == 200
    one, two = _key("one")[:8], _key("two")[:8]
    assert _actions(fake) == [("save", one), ("save", two), ("restore", one), ("save", one), ("restore", two)]
    assert fake.order == ["generate", "save", "generate", "save", "restore", "generate", "save", "restore", "generate"]
    assert not fake.crashed and fake.max_in_flight == 1
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="unpark", result="ok") == 2
    cache = gw.misses.snapshot("primary")["turns"]
    assert cache == {"new": 2, "unparked": 2}


@pytest.mark.parametrize("keep,stop", [(30, "tool_use"), (0.0, "tool_use"), (30, "end_turn")],
                         ids=["kept", "keep-off", "no-tool-asked"])
async def test_a_tool_loops_next_turn_finds_the_slot_kept_for_it(park_stack, gateway, serve_app, tmp_path, http, keep,
                                                                 stop):
    """Conversation one runs a tool loop (each turn sent as its last answer ends) while two waits: the
    slot is kept for one's next turn, so the slot does not switch (park, unpark) twice; two goes after.
    An answer that ends the turn (`end_turn`: the user types next) keeps nothing."""
    fake = parking_engine(tmp_path, prefill_delay=0.1)
    # A save costs something (the keep lasts no longer than a save and a restore: ~0.2 s here).
    fake.save_delay = 0.1
    url = await serve_app(fake.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url, "kv_save_dir": str(tmp_path),
                                             "kv_park_min_tokens": 0, "kv_save_idle_seconds": 3600}],
                               "queue": {"cache_preference_keep_seconds": keep}})
    gw = app[GATEWAY]
    await _until(lambda: gw.backends["primary"].health.state is State.READY)

    async def loop():
        for turn in range(3):
            # Each answer asks for a tool, but the last: the loop's next turn follows at once. The
            # first is held on the fake's gate until two waits (no clock a loaded machine could beat).
            body = {**main_body("one", turn=turn), "metadata": {"x_fake_stop_reason": stop if turn < 2
                                                                else "end_turn", **({"x_fake_hold": 1} if turn == 0 else {})}}
            assert (await post(http, base, body))[0] == 200

    fake.gate.clear()
    one = asyncio.create_task(loop())
    await _until(lambda: gw.backends["primary"].queue.busy == 1)
    two = asyncio.create_task(post(http, base, main_body("two")))
    await _until(lambda: gw.backends["primary"].queue.depth == 1)
    fake.gate.set()
    assert (await two)[0] == 200
    await one
    order = [t["conversation"] for t in gw.misses.snapshot("primary")["recent"]]
    a, b = _key("one")[:8], _key("two")[:8]
    kept = keep and stop == "tool_use"
    assert order == ([a, a, a, b] if kept else [a, b, a, a]), order
    assert _metric(gw, "orchestrator_cache_preferred_grants_total", backend="primary") == (2 if kept else 0)
    assert not fake.crashed and fake.max_in_flight == 1


async def test_a_park_is_not_skipped_while_an_earlier_saves_checksum_runs(park_stack, http, tmp_path, monkeypatch):
    """The checksum of a save (seconds for gigabytes) runs after its slot is in use again: the next
    switch parks all the same, and every save's metadata names its file once all are done."""
    from orchestrator.kv import store as kvsave

    def slow_checksum(path):
        import time
        time.sleep(0.3)
        return kvsave_checksum(path)

    kvsave_checksum = kvsave.checksum
    monkeypatch.setattr(kvsave, "checksum", slow_checksum)
    fake, base, gw = await park_stack()
    for first, turn in (("one", 0), ("two", 0), ("one", 1), ("two", 1)):
        assert (await post(http, base, main_body(first, turn=turn)))[0] == 200
    one, two = _key("one")[:8], _key("two")[:8]
    assert _actions(fake) == [("save", one), ("save", two), ("restore", one), ("save", one), ("restore", two)]
    b = gw.backends["primary"].kv
    await _until(lambda: b.saving == 0)
    named = {k.file for k in kv_folder.scan(tmp_path, set())}
    assert named == {p.name for p in tmp_path.glob("*.bin")} and len(named) == 2


def claude_turn(first: str, turn: int) -> dict:
    """Like Claude Code: the cache marker on the last message's last block, so it moves every turn,
    and a message sent as a string once it is not the last (the last one is a list, for the marker)."""
    body = main_body(first)
    body["system"][1]["cache_control"] = {"type": "ephemeral"}
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": first}]}]
    body["messages"] += [{"role": "user", "content": f"turn {n}"} for n in range(1, turn + 1)]
    last = body["messages"][-1]
    if isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}]
    body["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return body


async def test_a_conversation_whose_cache_marker_moved_is_unparked_as_the_same_one(park_stack, http):
    """Found with the real CLI (test_claude_code_parking.py): the marker on turn 1's first message
    made turn 2 a new conversation, so its save was never restored, and the last message's change of
    form made a turn's prefix seem changed where the previous turn ended."""
    assert conversation_key(claude_turn("one", 0)) == conversation_key(claude_turn("one", 2))
    fake, base, gw = await park_stack()
    for first, turn in (("one", 0), ("two", 0), ("one", 1), ("two", 1), ("one", 2)):
        assert (await post(http, base, claude_turn(first, turn)))[0] == 200
    assert [a for a, _ in fake.actions] == ["save", "save", "restore", "save", "restore", "save", "restore"]
    assert gw.misses.snapshot("primary")["turns"] == {"new": 2, "unparked": 3}


async def test_a_busy_conversation_is_checkpointed_before_its_next_turn_once_it_grew(park_stack, http):
    fake, base, gw = await park_stack(kv_checkpoint_share=0.5)
    for turn in range(3):
        assert (await post(http, base, main_body("one", turn=turn)))[0] == 200
    # The fake answers every turn with 18 tokens: the first checkpoint saves them all, the next
    # finds nothing new on the slot and leaves it; the slot was never restored (it held the turn).
    assert [a for a, _ in fake.actions] == ["save"]
    assert fake.order == ["generate", "save", "generate", "generate"]
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="checkpoint", result="ok") == 1
    assert _metric(gw, "orchestrator_kv_park_seconds_count", backend="primary", action="checkpoint") == 1


async def test_a_checkpoint_under_the_share_is_taken_when_computing_again_would_cost_more_than_the_save(
        park_stack, http):
    """The measured rule (issue 19: weigh both in measured terms): with a save far cheaper than the
    prefill of the tokens not on disk, a busy conversation is saved before its next turn although
    those tokens are under kv_checkpoint_share of it; with the save dearer, it is not."""
    fake, base, gw = await park_stack(kv_checkpoint_share=0.9)
    b, p, key = gw.backends["primary"].kv, gw.backends["primary"].parking, _key("one")
    assert (await post(http, base, main_body("one", turn=0)))[0] == 200
    # The fake's every turn counts 18 tokens: as if 14 of them were on disk, 4 not (22%, under 0.9).
    b.saved[key] = 14
    p.prefill_pace, p.save_pace = 0.01, 0.0001  # 4 tokens again: 40 ms; a save of 18: 1.8 ms
    assert (await post(http, base, main_body("one", turn=1)))[0] == 200
    assert [a for a, _ in fake.actions] == ["save"]
    b.saved[key] = 14
    p.prefill_pace, p.save_pace = 0.0001, 0.01  # 0.4 ms against 180 ms: not worth it
    assert (await post(http, base, main_body("one", turn=2)))[0] == 200
    assert [a for a, _ in fake.actions] == ["save"]
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="checkpoint", result="ok") == 1


def test_the_prefill_pace_is_measured_from_a_streamed_turn_that_computed_enough_of_its_prompt():
    from types import SimpleNamespace

    from orchestrator.kv.parking import Parking
    from orchestrator.request.accounting import Outcome
    from orchestrator.request.parking import SlotTurn, answered

    parking = Parking(holder="k")
    backend = SimpleNamespace(parking=parking)
    conversation = SimpleNamespace(key="k")
    # 0.5 s to the first content, 0.1 s of it parking: 0.4 s for 1000 computed tokens.
    answered(backend, conversation, Outcome("p", first_content=10.5, granted=10.0, input_tokens=1000),
             SlotTurn(park=0.1))
    assert parking.holder_whole and parking.prefill_pace == pytest.approx(0.0004)
    # A turn that computed few tokens (its fixed cost would dominate), or was not streamed, says
    # nothing of the prefill's pace.
    answered(backend, conversation, Outcome("p", first_content=20.0, granted=10.0, input_tokens=100), SlotTurn())
    answered(backend, conversation, Outcome("p", granted=10.0, input_tokens=5000), SlotTurn())
    assert parking.prefill_pace == pytest.approx(0.0004)
    parking.prefill_pace = 0.004
    # Before a save's pace is known, only the share decides.
    assert not parking.checkpoint_pays(0.05, 40, 1000) and parking.checkpoint_pays(0.05, 60, 1000)
    parking.save_pace = 0.0001  # a save of 1000 tokens: 0.1 s; computing 40 again: 0.16 s
    assert parking.checkpoint_pays(0.05, 40, 1000) and not parking.checkpoint_pays(0.05, 20, 1000)


async def test_a_checkpoint_expected_to_hold_a_waiter_too_long_is_skipped(park_stack, http):
    fake, base, gw = await park_stack(kv_park_max_seconds=0.0)
    gw.backends["primary"].parking.save_pace = 1.0  # a second per token: 18 s expected
    for turn in range(2):
        assert (await post(http, base, main_body("one", turn=turn)))[0] == 200
    assert fake.actions == []
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="checkpoint", result="too_slow") == 1


async def test_a_park_dearer_than_computing_the_conversation_again_is_skipped(park_stack, http):
    """A park is on the incoming request's path: at a save pace slower than the prefill pace (both as
    measured), restoring later would not pay for it, so the switch goes on without it."""
    fake, base, gw = await park_stack()
    b = gw.backends["primary"].parking
    assert (await post(http, base, main_body("one")))[0] == 200
    b.save_pace, b.prefill_pace = 0.02, 0.01  # 0.36 s to save 18 tokens, 0.18 s to compute them
    assert (await post(http, base, main_body("two")))[0] == 200
    assert fake.actions == []
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="park", result="too_slow") == 1
    b.save_pace, b.prefill_pace = 0.0001, 0.01
    assert (await post(http, base, main_body("one", turn=1)))[0] == 200
    assert [a for a, _ in fake.actions] == ["save"]


async def test_after_parks_skipped_in_a_row_as_dearer_one_runs_to_measure_the_save_again(park_stack, http):
    """A save pace measured on a small save (its fixed cost spread on few tokens) must not switch
    parking off for good: the PARK_RETRY_AFTER-th skipped park in a row runs, and its pace is new."""
    from orchestrator.kv.parking import PARK_RETRY_AFTER

    fake, base, gw = await park_stack()
    b = gw.backends["primary"].parking
    paces = []
    for turn in range(PARK_RETRY_AFTER + 1):
        for first in ("one", "two"):
            b.save_pace, b.prefill_pace = 0.02, 0.01  # 0.36 s to save 18 tokens, 0.18 s to compute them
            assert (await post(http, base, main_body(first, turn=turn)))[0] == 200
            paces.append(b.save_pace)
    # 17 switches: 8 skipped, the 9th parked (its pace measured anew), 8 skipped again.
    assert [a for a, _ in fake.actions if a == "save"] == ["save"]
    assert sum(p != 0.02 for p in paces) == 1
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="park",
                   result="too_slow") == 2 * (PARK_RETRY_AFTER + 1) - 1 - 1


async def test_a_vanished_client_never_lets_a_park_run_beside_a_generation(park_stack, http):
    fake, base, gw = await park_stack()
    fake.save_delay = 0.4
    assert (await post(http, base, main_body("one")))[0] == 200
    # Conversation two's request parks one; its client leaves in the middle of the save.
    leaving = asyncio.create_task(post(http, base, main_body("two")))
    await _until(lambda: fake.saving)
    leaving.cancel()
    # A third conversation comes at once: it must wait for the save to end.
    status, *_ = await post(http, base, main_body("three"))
    assert status == 200
    assert not fake.crashed and fake.max_in_flight == 1
    assert fake.order[:3] == ["generate", "save", "generate"]
    assert gw.backends["primary"].queue.busy == 0


@pytest.mark.parametrize("action", ["save", "restore"])
async def test_a_crash_during_a_park_or_an_unpark_leaves_the_conversation_cold_not_wrong(park_stack, http, tmp_path,
                                                                                       action):
    fake, base, gw = await park_stack()
    for first in ("one", "two"):
        assert (await post(http, base, main_body(first)))[0] == 200
    fake.die_on = action
    # "save": two's park dies, so it has no save; "restore": one's unpark dies, the slot empty.
    status, *_ = await post(http, base, main_body("one", turn=1))
    assert status == 200 and not fake.crashed
    assert fake.order[-1] == "generate"
    parking = gw.backends["primary"].parking
    if action == "save":
        assert not (tmp_path / f"{_key('two')}.json").exists()
        assert not [p for p in tmp_path.glob(f"{_key('two')}*.bin")]
    else:
        assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="unpark", result="failed") == 1
        assert gw.misses.snapshot("primary")["recent"][-1]["reason"] == "switched"
    assert parking.holder == _key("one")
    # The next turn goes on as usual.
    fake.die_on = ""
    assert (await post(http, base, main_body("one", turn=2)))[0] == 200


async def test_the_save_restored_after_a_restart_is_neither_restored_again_nor_saved_again_at_once(park_stack, http):
    """A crash in a busy session: the restart's restore puts the waiter's checkpoint back. llama-server's
    /slots shows no tokens after a restore, which once made the waiter's unpark restore it a second
    time on the crash-hit turn's path, and the turn after it checkpoint the whole conversation again."""
    fake, base, gw = await park_stack(kv_checkpoint_share=0.5)
    for turn in range(2):  # turn 1's checkpoint saves turn 0's 18 tokens
        assert (await post(http, base, main_body("one", turn=turn)))[0] == 200
    await _until(lambda: not gw.backends["primary"].kv.saving)  # its checksum and metadata written
    fake.actions.clear()
    fake.order.clear()
    status, *_ = await _crash_and_queue(fake, base, gw, http, main_body("one", turn=2))
    assert status == 200
    assert fake.order == ["restore", "generate"]
    # 18 tokens now, 10 of them in the restored save: under half of it unsaved, no checkpoint yet.
    assert (await post(http, base, main_body("one", turn=3)))[0] == 200
    assert fake.order == ["restore", "generate", "generate"] and not fake.crashed


async def test_a_backend_with_several_slots_never_parks(park_stack, http):
    fake, base, gw = await park_stack(slots=2)
    fake.capacity = 2
    for first in ("one", "two", "one"):
        assert (await post(http, base, main_body(first)))[0] == 200
    assert fake.actions == []


# ---- after a restart: the waiter's own save, else the longest shared prefix, else nothing -------

def test_a_waiter_without_a_save_gets_the_longest_shared_prefix_never_an_unrelated_one():
    def body(system: str, first: str) -> dict:
        return {"system": [{"type": "text", "text": system}], "messages": [{"role": "user", "content": first}]}
    saves = [{"key": "a", "time": 1, "prefix": Conversation(body("agent", "x")).prefix},
             {"key": "b", "time": 2, "prefix": Conversation(body("main", "y")).prefix}]
    waiter = Conversation(body("main", "z"))
    assert prefixes.for_waiter(saves, waiter.key, waiter.prefix)["key"] == "b"
    assert prefixes.for_waiter(saves, "a", waiter.prefix)["key"] == "a"
    stranger = Conversation(body("other", "z"))
    assert prefixes.for_waiter(saves, stranger.key, stranger.prefix) is None


# ---- why the cache missed ------------------------------------------------------------------------

def test_each_turn_says_why_its_prompt_was_computed():
    misses = CacheMisses(Metrics(CollectorRegistry(), ["b"]))

    def turn(system: str, n: int, how: str, prompt: int, cached: int) -> dict:
        body = {"system": [{"type": "text", "text": system}],
                "messages": [{"role": "user", "content": f"m{i}"} for i in range(n)]}
        c = Conversation({**body, "messages": body["messages"][:1]})
        return misses.observe("b", c.key, Conversation(body).blocks, ServedTurn(SlotFound(how), prompt, cached))

    assert turn("s", 1, "empty", 100, 0)["reason"] == "new"
    assert turn("s", 2, "same", 120, 100)["reason"] == "hit"
    assert turn("s", 3, "same", 140, 20)["reason"] == "evicted"
    assert turn("s", 4, "unparked", 160, 140)["reason"] == "unparked"
    assert turn("s", 5, "switched", 180, 10)["reason"] == "switched"
    first_other = turn("t", 1, "same", 100, 0)  # another system prompt: another conversation
    assert first_other["reason"] == "new"
    # Same conversation key (first message), but its second message changed: the prefix parts there.
    body = {"system": [{"type": "text", "text": "s"}],
            "messages": [{"role": "user", "content": "m0"}, {"role": "user", "content": "CHANGED"}]}
    c = Conversation({**body, "messages": body["messages"][:1]})
    changed = misses.observe("b", c.key, Conversation(body).blocks, ServedTurn(SlotFound.SAME, 60, 40))
    assert changed["reason"] == "prefix_changed"
    assert changed["at_block"] == "messages[1].user[0]:text" and changed["at_token"] == 40
    reg = misses.metrics.registry
    assert reg.get_sample_value("orchestrator_cache_prefix_changes_total", {"backend": "b", "kind": "messages"}) == 1
    assert reg.get_sample_value("orchestrator_cache_turns_total", {"backend": "b", "reason": "evicted"}) == 1
    assert reg.get_sample_value("orchestrator_cache_computed_tokens_total", {"backend": "b", "reason": "switched"}) == 170


def test_the_cache_mark_moving_to_the_next_turn_changes_neither_the_key_nor_the_prefix():
    """Claude Code marks the last message's last block with cache_control: on turn 1 that is the first
    message, on turn 2 it is not. Found with the real CLI (`--resume`, test_claude_code.py)."""
    system = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    task = {"type": "text", "text": "Say hi"}
    marked = {**task, "cache_control": {"type": "ephemeral"}}
    one = {"system": system, "messages": [{"role": "user", "content": [marked]}]}
    two = {"system": system, "messages": [
        {"role": "user", "content": [task]}, {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        {"role": "user", "content": [{"type": "text", "text": "again", "cache_control": {"type": "ephemeral"}}]}]}
    assert conversation_key(one) == conversation_key(two)
    assert Conversation(one).prefix == Conversation(two).prefix[:2]
    misses = CacheMisses(Metrics(CollectorRegistry(), ["b"]))
    misses.observe("b", Conversation(one).key, Conversation(one).blocks, ServedTurn(SlotFound.SAME, 30, 0))
    seen = misses.observe("b", Conversation(two).key, Conversation(two).blocks, ServedTurn(SlotFound.SAME, 40, 30))
    assert seen["reason"] == "hit"
    # Another first message is still another conversation.
    other = {**one, "messages": [{"role": "user", "content": [{**task, "text": "Say bye"}]}]}
    assert conversation_key(other) != conversation_key(one)


def test_a_slot_is_kept_no_longer_than_a_switch_would_cost():
    from types import SimpleNamespace

    from orchestrator.kv.parking import Parking
    from orchestrator.request.parking import keep_seconds

    def backend(slots=1, pace=0.0, park=True):
        return SimpleNamespace(config=SimpleNamespace(kv_park=park), queue=SimpleNamespace(slots=slots), kv=object(),
                               parking=Parking(save_pace=pace))

    assert keep_seconds(backend(pace=1e-5), 10_000, 0.5) == pytest.approx(0.2)  # a save and a restore
    assert keep_seconds(backend(pace=1e-3), 10_000, 0.5) == 0.5                 # at most the cap
    assert keep_seconds(backend(pace=0.0), 10_000, 0.5) == 0.5                  # no pace measured yet
    assert keep_seconds(backend(park=False), 10_000, 0.5) == 0.5                # a switch re-prefills
    assert keep_seconds(backend(slots=2, pace=1e-5), 10_000, 0.5) == 0.0        # several slots: no keep
    assert keep_seconds(backend(pace=1e-5), 10_000, 0.0) == 0.0                 # off


def test_make_status_says_why_the_cache_missed():
    from orchestrator.ops.status import kv_lines

    health = {"backends": [{"name": "primary", "cache": {"turns": {"new": 1, "prefix_changed": 1}, "recent": [
        {"reason": "prefix_changed", "at_token": 512, "at_block": "system[1]", "cached": 512, "prompt": 1600}]}}]}
    assert kv_lines(health, 0.0) == ["prompt cache: primary turns new 1, prefix_changed 1; last prefix_changed "
                                     "at token 512 (system[1]), 512/1,600 from cache"]

