import asyncio

import pytest

from prometheus_client import CollectorRegistry

from orchestrator.backends.health import BackendHealth, State
from orchestrator.config import BackendConfig
from orchestrator.engines.llama_server import LlamaServer
from orchestrator.engines.upstream import UpstreamClient
from orchestrator.errors import Overloaded
from orchestrator.metrics import Metrics
from orchestrator.slots import SlotQueue


class FakeWatch:
    def __init__(self, log_file: str = "", workers: tuple[str, ...] = ()):
        self.info_value = {"statename": "RUNNING", "pid": 100}
        self.log_file = log_file
        self.workers = dict.fromkeys(workers, "")
        self.worker_values: list[dict] = []
        self.restarts = 0

    async def info(self):
        return self.info_value

    async def worker_infos(self):
        return self.worker_values

    async def restart(self):
        self.restarts += 1


DEAD = BackendConfig(name="p", url="http://127.0.0.1:9", command="x", start_retries=2)


def restarts_counted(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("orchestrator_backend_restarts_total", {"backend": "p"}) or 0


async def test_down_holds_queue_and_grace_fails_waiters_naming_log(upstream):
    q = SlotQueue("p", 1)
    h = BackendHealth(LlamaServer(DEAD, upstream), q, grace=0.2, watch=FakeWatch(log_file="/var/log/llama-p.log"))
    await h.check(timeout=1)
    assert h.state is State.DOWN and not q.is_open
    waiter = asyncio.create_task(q.acquire())
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await h.check(timeout=1)
    with pytest.raises(Overloaded) as e:
        await waiter
    assert "'p'" in e.value.message and "/var/log/llama-p.log" in e.value.message
    assert "down_grace_seconds" in e.value.message


async def test_pid_change_counts_a_restart_and_fatal_fails(upstream):
    q = SlotQueue("p", 1)
    metrics = Metrics(CollectorRegistry(), ["p"])
    watch = FakeWatch(log_file="L")
    h = BackendHealth(LlamaServer(DEAD, upstream), q, watch=watch, metrics=metrics)
    await h.check(timeout=1)
    assert restarts_counted(metrics) == 0 and h.pid == 100
    watch.info_value = {"statename": "RUNNING", "pid": 101}
    await h.check(timeout=1)
    assert restarts_counted(metrics) == 1 and h.restarts == 1 and h.last_restart
    watch.info_value = {"statename": "FATAL", "pid": 0}
    await h.check(timeout=1)
    assert h.state is State.FAILED
    with pytest.raises(Overloaded, match="FATAL"):
        await q.acquire()
    h.mark_down("connection refused")  # a later connection failure does not hide FATAL
    assert h.state is State.FAILED


def test_one_crash_is_one_restart_whatever_order_events_and_polls_arrive_in():
    """A poll may see the new process before supervisord's EXITED event for the old one arrives
    (found by the soak): the old pid coming back in that event is not another restart."""
    metrics = Metrics(CollectorRegistry(), ["p"])
    h = BackendHealth(LlamaServer(DEAD, UpstreamClient()), SlotQueue("p", 1), metrics=metrics)
    for state, pid in [("RUNNING", 100), ("STARTING", 200), ("EXITED", 100), ("STARTING", 200), ("RUNNING", 200),
                       ("EXITED", 200), ("BACKOFF", None), ("STARTING", 300), ("RUNNING", 300)]:
        h.observe_process(state, pid)
    assert h.restarts == 2 and restarts_counted(metrics) == 2 and h.pid == 300


class RestartingWatch(FakeWatch):
    """supervisord as the gateway sees it: a running program that can be restarted."""

    def __init__(self):
        super().__init__()
        self.program = "llama-small"


async def test_a_dead_rpc_worker_takes_the_split_down_and_its_return_restarts_the_head():
    """The head says "ok" while a worker is dead and aborts at its next use of it, and never reconnects
    to the worker when it is back (docs/rpc-split.md): down until every worker runs, then the head is
    restarted once. The workers' first start restarts nothing."""
    watch = FakeWatch(workers=("rpc-p-0", "rpc-p-1"))
    h = BackendHealth(LlamaServer(DEAD, UpstreamClient()), SlotQueue("p", 1), watch=watch)
    for state in ("STARTING", "RUNNING"):
        h.observe_worker("rpc-p-0", state, 10)
        h.observe_worker("rpc-p-1", state, 11)
    assert watch.restarts == 0 and h.up
    h.observe_worker("rpc-p-1", "EXITED", 11)
    assert h.state is State.DOWN and not h.queue.is_open
    watch.info_value = {"statename": "RUNNING", "pid": 100}
    assert await h.check(timeout=1) is State.DOWN  # the head answers "ok"; a worker is still out
    h.observe_worker("rpc-p-1", "STARTING", 12)
    h.observe_worker("rpc-p-1", "RUNNING", 12)
    await asyncio.sleep(0)
    assert watch.restarts == 1
    # A restart seen only by a poll (a new pid, RUNNING all along) counts too.
    watch.worker_values = [{"name": "rpc-p-0", "statename": "RUNNING", "pid": 13},
                           {"name": "rpc-p-1", "statename": "RUNNING", "pid": 12}]
    await h._check_process()
    await asyncio.sleep(0)
    assert watch.restarts == 2 and h.snapshot()["rpc_workers"] == {"rpc-p-0": "RUNNING", "rpc-p-1": "RUNNING"}


async def test_a_background_slot_held_past_the_bound_is_stuck_in_health_and_restarted(gateway, serve_app, http):
    """A title the server is wedged on (a grammar it cannot build; /health still answers): the gateway
    gives up on it, the slot stays held past gateway.release_timeout_seconds, so /health says `stuck`,
    supervisord restarts the server, and titles meanwhile get the synthetic answer at once."""
    from testkit.client import sample
    from testkit.engine import FakeEngine

    from orchestrator.backends.gateway import GATEWAY

    title = sample("title-2.1.332.json")["body"]
    # It lets go of the abandoned request only when the test says so: no clock for "stuck" to beat.
    small = FakeEngine(mode="stall", linger=600, linger_ends=asyncio.Event())
    base, app = await gateway({
        "backends": [{"name": "primary", "url": await serve_app(FakeEngine().app())},
                     {"name": "small", "url": await serve_app(small.app()), "role": "background"}],
        "routing": {"background": "small", "background_timeout_seconds": 0.2},
        "gateway": {"release_timeout_seconds": 0.3}})
    gw = app[GATEWAY]
    watch = gw.backends["small"].health.watch = RestartingWatch()

    async def small_state() -> str:
        async with http.get(base + "/health") as r:
            return next(b for b in (await r.json())["backends"] if b["name"] == "small")["state"]

    async with http.post(base + "/v1/messages", json=title) as r:
        assert r.status == 200  # the synthetic title, after background_timeout_seconds
    async with asyncio.timeout(60):
        while await small_state() != "stuck":
            await asyncio.sleep(0.05)
    assert watch.restarts == 1 and "abandoned" in gw.backends["small"].health.last_error
    async with http.post(base + "/v1/messages", json=title) as r:
        assert r.status == 200
    # Not queued behind the stuck slot: it never reached the small model, nor waited out
    # background_timeout_seconds for it (that would count a second timeout), whatever the clock says.
    assert len(small.requests) == 1
    assert gw.metrics.background_answers.labels("small", "title", "timeout")._value.get() == 1
    small.in_flight = 0  # the restarted server holds nothing
    small.linger_ends.set()
    async with asyncio.timeout(60):
        while await small_state() != "ready":
            await asyncio.sleep(0.05)
    assert gw.backends["small"].queue.busy == 0


@pytest.mark.real
async def test_process_watch_restarts_a_supervised_server_through_supervisord(stack):  # noqa: F811
    """What mark_stuck calls for a wedged background server, against a real supervisord."""
    from orchestrator.backends.health import ProcessWatch

    s = stack()
    await asyncio.to_thread(s.up)
    before = s.pid("llama-primary")
    await ProcessWatch(str(s.paths.socket), "llama-primary").restart()
    async with asyncio.timeout(60):
        while s.state("llama-primary") != "RUNNING":
            await asyncio.sleep(0.2)
    assert s.pid("llama-primary") != before
