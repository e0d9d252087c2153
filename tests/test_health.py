import asyncio

import pytest

from orchestrator.config import BackendConfig
from orchestrator.errors import Overloaded
from orchestrator.health import BackendHealth, State
from orchestrator.slots import SlotQueue
from orchestrator.upstream import UpstreamClient


class FakeWatch:
    def __init__(self):
        self.info_value = {"statename": "RUNNING", "pid": 100}

    async def info(self):
        return self.info_value


@pytest.fixture
async def upstream():
    u = UpstreamClient(connect_timeout=1)
    await u.start()
    yield u
    await u.close()


DEAD = BackendConfig(name="p", url="http://127.0.0.1:9", command="x", start_retries=2)


async def test_down_holds_queue_and_grace_fails_waiters_naming_log(upstream):
    q = SlotQueue("p", 1)
    h = BackendHealth(DEAD, q, grace=0.2, log_file="/var/log/llama-p.log")
    await h.check(upstream, timeout=1)
    assert h.state is State.DOWN and not q.is_open
    waiter = asyncio.create_task(q.acquire())
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await h.check(upstream, timeout=1)
    with pytest.raises(Overloaded) as e:
        await waiter
    assert "'p'" in e.value.message and "/var/log/llama-p.log" in e.value.message
    assert "down_grace_seconds" in e.value.message


async def test_pid_change_counts_a_restart_and_fatal_fails(upstream):
    q = SlotQueue("p", 1)
    restarts = []
    watch = FakeWatch()
    h = BackendHealth(DEAD, q, watch=watch, on_restart=restarts.append, log_file="L")
    await h.check(upstream, timeout=1)
    assert restarts == [] and h.pid == 100
    watch.info_value = {"statename": "RUNNING", "pid": 101}
    await h.check(upstream, timeout=1)
    assert restarts == ["p"] and h.restarts == 1 and h.last_restart
    watch.info_value = {"statename": "FATAL", "pid": 0}
    await h.check(upstream, timeout=1)
    assert h.state is State.FAILED
    with pytest.raises(Overloaded, match="FATAL"):
        await q.acquire()
    h.mark_down("connection refused")  # a later connection failure does not hide FATAL
    assert h.state is State.FAILED


def test_one_crash_is_one_restart_whatever_order_events_and_polls_arrive_in():
    """A poll may see the new process before supervisord's EXITED event for the old one arrives
    (found by the soak): the old pid coming back in that event is not another restart."""
    restarts = []
    h = BackendHealth(DEAD, SlotQueue("p", 1), on_restart=restarts.append)
    for state, pid in [("RUNNING", 100), ("STARTING", 200), ("EXITED", 100), ("STARTING", 200), ("RUNNING", 200),
                       ("EXITED", 200), ("BACKOFF", None), ("STARTING", 300), ("RUNNING", 300)]:
        h.observe_process(state, pid)
    assert h.restarts == 2 and restarts == ["p", "p"] and h.pid == 300
