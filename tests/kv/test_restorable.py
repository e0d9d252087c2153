"""Saves only where a restore can bring them back (kv/restorable.py): a sliding-window model without
--swa-full is neither parked, unparked, checkpointed nor idle-saved, and each of its misses says
why; restores that read back less than they held are counted and, a few in a row, turn themselves off."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from test_kvsave import _metric, main_body
from test_parking import _key, park_stack  # noqa: F401 - the fixture

from orchestrator.engines.model_cache import CacheKind, ModelCache
from orchestrator.kv.cachemiss import CacheMisses, ServedTurn
from orchestrator.kv.parking import SlotFound
from orchestrator.kv.restorable import INSTEAD, OFF_AFTER, RestoreWatch
from orchestrator.metrics import Metrics
from testkit.client import post

SWA = ModelCache(CacheKind.SLIDING_WINDOW, "gemma3", 512, swa_full=False, restorable=False,
                 why="sliding-window model without --swa-full", model="/m/gemma.gguf")
DENSE = ModelCache(CacheKind.DENSE, "llama", restorable=True, model="/m/smol.gguf")


def test_the_model_turns_restores_off_and_short_restores_do_after_a_few_in_a_row():
    w = RestoreWatch()
    assert w.off == "" and w.view()["on"]
    w.learned(SWA)
    assert w.off == "sliding-window model without --swa-full"
    w.learned(None)  # not known at this restart: the last one stays
    assert w.off
    w = RestoreWatch()
    w.learned(DENSE)
    assert not w.after_restore(RestoreWatch.short(4000, 100), 4000, 100)
    assert not w.after_restore(False, 4000, 3990)  # a good one breaks the row
    for i in range(OFF_AFTER):
        turned = w.after_restore(RestoreWatch.short(4000, 100), 4000, 100)
        assert turned is (i == OFF_AFTER - 1)
    assert w.off == f"{OFF_AFTER} restores in a row read back less than they held (last: 100 of 4000 tokens from cache)"
    assert w.view() == {"on": False, "off_because": w.off, "instead": INSTEAD, "short_in_row": OFF_AFTER,
                        "short_total": OFF_AFTER + 1}
    w.learned(DENSE)  # the same model after a restart: still off
    assert w.off
    w.learned(ModelCache(CacheKind.DENSE, "llama", restorable=True, model="/m/other.gguf"))
    assert w.off == ""  # another model: measured anew
    assert not RestoreWatch.short(100, 0)  # too small to judge


def test_a_miss_a_restore_could_not_spare_says_why():
    misses = CacheMisses(Metrics(CollectorRegistry(), ["b"]))
    blocks = [("system[0]", "s"), ("messages[0]", "m")]
    turn = lambda how, prompt, cached, off="": ServedTurn(how, prompt, cached, 0.0, off)  # noqa: E731
    assert misses.observe("b", "k", blocks, turn(SlotFound.SAME, 1000, 0, SWA.why))["reason"] == "new"
    seen = misses.observe("b", "k", blocks, turn(SlotFound.SWITCHED, 1100, 0, SWA.why))
    assert (seen["reason"], seen["why"]) == ("restore_ineffective", "sliding-window model without --swa-full")
    seen = misses.observe("b", "k", blocks, turn(SlotFound.EMPTY, 1200, 0, SWA.why))  # after a restart
    assert seen["reason"] == "restore_ineffective"
    seen = misses.observe("b", "k", blocks, turn(SlotFound.UNPARKED, 1300, 20))  # an "ok" unpark, 20 read
    assert (seen["reason"], seen["why"]) == ("restore_ineffective", "restore read back 20 of 1200 tokens")
    assert misses.observe("b", "k", blocks, turn(SlotFound.UNPARKED, 1400, 1290))["reason"] == "unparked"
    assert misses.observe("b", "k", blocks, turn(SlotFound.SWITCHED, 1500, 0))["reason"] == "switched"
    # A switch the server's own prompt cache in RAM served (a hybrid model's, saves off) is a hit.
    assert misses.observe("b", "k", blocks, turn(SlotFound.SWITCHED, 1600, 1490, "off"))["reason"] == "hit"


async def test_a_sliding_window_model_without_swa_full_is_never_saved_for_nothing(park_stack, http):  # noqa: F811
    fake, base, gw = await park_stack(kv_save_idle_seconds=0.05)
    backend = gw.backends["primary"]
    backend.kv.watch.learned(SWA)
    for first, turn in (("one", 0), ("two", 0), ("one", 1), ("two", 1)):
        assert (await post(http, base, main_body(first, turn=turn)))[0] == 200
    await asyncio.sleep(0.3)  # past the idle save's 0.05 s
    assert fake.actions == []  # no park, no unpark, no checkpoint, no idle save
    cache = gw.misses.snapshot("primary")
    assert cache["turns"] == {"new": 2, "restore_ineffective": 2}
    assert cache["recent"][-1]["why"] == "sliding-window model without --swa-full"
    assert gw.kv_view(backend)["kv_saves"]["off_because"] == SWA.why
    assert _metric(gw, "orchestrator_kv_parks_total", backend="primary", action="park", result="ok") == 0
    health = await (await http.get(f"{base}/health")).json()
    assert health["backends"][0]["kv_saves"]["on"] is False


async def test_on_a_dense_model_parking_goes_on_as_before(park_stack, http):  # noqa: F811
    fake, base, gw = await park_stack()
    gw.backends["primary"].kv.watch.learned(DENSE)
    for first, turn in (("one", 0), ("two", 0), ("one", 1)):
        assert (await post(http, base, main_body(first, turn=turn)))[0] == 200
    one, two = _key("one")[:8], _key("two")[:8]
    assert [(a, n.split("-")[0][:8]) for a, n in fake.actions] == [("save", one), ("save", two), ("restore", one)]


