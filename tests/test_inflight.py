"""The in-flight registry: bounded, states derived from the live outcome, cancel cancels the task."""

import asyncio

from orchestrator.backends import inflight
from orchestrator.backends.inflight import Registry
from orchestrator.request.accounting import Outcome


async def test_states_follow_the_outcome_and_end_in_recent():
    reg = Registry(max_recent=2)

    async def request():
        entry = reg.begin({"X-Claude-Code-Session-Id": "s\x00" + "x" * 500}, asyncio.current_task())
        assert entry.state == "parsing"
        outcome = Outcome("primary")
        inflight.attach(outcome, "main", "main")
        assert entry.state == "queued"
        outcome.reset(granted=entry.arrived + 1)
        assert entry.state == "prefill"
        outcome.first_content = entry.arrived + 2
        assert entry.state == "generating"
        return entry

    entry = await asyncio.create_task(request())
    assert len(entry.session) == inflight.HEADER_CHARS - 1 and "\x00" not in entry.session
    reg.end(entry, "200")
    assert reg.snapshot()["inflight"] == [] and reg.snapshot()["recent"][0]["wait"] == 1.0


async def test_bounded_and_cancel_only_what_runs():
    reg = Registry(max_inflight=1, max_recent=1)
    task = asyncio.create_task(asyncio.sleep(10))
    entry = reg.begin({}, task)
    assert reg.begin({}, task) is None  # past the bound: untracked
    assert reg.cancel(entry.id) and not reg.cancel(entry.id) and not reg.cancel(999)
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    reg.end(entry, "client_gone")
    assert reg.snapshot()["recent"][0]["status"] == "cancelled"
    other = reg.begin({}, None)
    reg.end(other, "200")
    assert [r["id"] for r in reg.snapshot()["recent"]] == [other.id]
