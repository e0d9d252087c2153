import json
"""The tracker of what runs: bounded, states derived from the live outcome, cancel cancels the task,
the agent tree and the sends views of it."""

import asyncio

from orchestrator.backends import identity
from orchestrator.backends.identity import Identity, from_headers
from orchestrator.backends.inflight import InFlight
from orchestrator.request.accounting import Outcome


async def test_states_follow_the_outcome_and_end_in_recent():
    reg = InFlight(max_recent=2)

    async def request():
        forged = from_headers({identity.SESSION: "s\x00" + "x" * 500})
        entry = reg.begin(forged, asyncio.current_task())
        assert entry.state == "parsing"
        outcome = Outcome("primary")
        reg.forwarded(entry, outcome, "main", "main")
        assert entry.state == "queued"
        outcome.reset(granted=entry.arrived + 1)
        assert entry.state == "prefill"
        outcome.first_content = entry.arrived + 2
        assert entry.state == "generating"
        return entry

    entry = await asyncio.create_task(request())
    shown = reg.snapshot()["inflight"][0]["session"]  # shown cleaned, though it names no one
    assert len(shown) == identity.SHOWN_CHARS - 1 and "\x00" not in shown and entry.identity == Identity()
    reg.end(entry, "200")
    assert reg.snapshot()["inflight"] == [] and reg.snapshot()["recent"][0]["wait"] == 1.0


async def test_bounded_and_cancel_only_what_runs():
    reg = InFlight(max_listed=1, max_recent=1)
    task = asyncio.create_task(asyncio.sleep(10))
    entry = reg.begin(Identity(), task)
    past = reg.begin(Identity(), None)
    assert [e["id"] for e in reg.snapshot()["inflight"]] == [entry.id]  # past the bound: not listed
    assert reg.cancel(entry.id) and not reg.cancel(entry.id) and not reg.cancel(999)
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    reg.end(entry, "client_gone")
    assert reg.snapshot()["recent"][0]["status"] == "cancelled"
    reg.end(past, "200")
    other = reg.begin(Identity(), None)
    reg.end(other, "200")
    assert [r["id"] for r in reg.snapshot()["recent"]] == [other.id]


def test_sends_are_counted_per_backend_while_they_run():
    reg = InFlight()
    call = reg.start_send("primary")
    assert reg.sends("primary") == {call} and reg.sends("small") == set()
    reg.end_send("primary", call)
    assert reg.sends("primary") == set()


def test_the_page_lists_the_first_of_a_long_queue_and_counts_the_rest():
    from types import SimpleNamespace
    reg = InFlight()
    waiting = [reg.begin(Identity(), None) for _ in range(300)]
    for i, e in enumerate(waiting):
        reg.forwarded(e, SimpleNamespace(granted=None, first_content=None), "main",
                      "background" if i % 2 else "main")
    snap = reg.snapshot()
    assert snap["queued"] == 300 and len(snap["queue"]) == reg.max_listed == 50
    assert [r["id"] for r in snap["queue"]] == [e.id for e in waiting[0:100:2]]  # main work first, oldest first
    assert len(json.dumps(snap)) < 40_000
