"""supervisord runs the stack, for real: a crashed llama-server restarted with its queued requests
answered, its events, `down` leaving no process (the rendering: tests/ops/test_supervise.py)."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.ops import status as status_view
from orchestrator.ops import supervise
from orchestrator.sse import events as sse_events
from testkit.client import post
from testkit.stack import wait_health

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.real
async def test_segv_of_llama_server_loses_no_queued_request(stack, http):
    s = stack()
    assert s.up() == "started"
    await wait_health(http, s.url)
    llama_pid, gw_pid = s.pid("llama-primary"), s.pid("gateway")
    restarts_before = await s.metric(http, "orchestrator_backend_restarts_total")

    long = asyncio.create_task(post(http, s.url, {"model": "m", "max_tokens": 400, "stream": True,
                                     "messages": [{"role": "user", "content": "Write a long story about a dragon"}]}))
    async def backend(key):
        async with http.get(s.url + "/health") as r:
            return (await r.json())["backends"][0][key]

    # Wait until the long answer is streaming, then queue three more behind it.
    async with asyncio.timeout(30):
        while await backend("busy") != 1:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    queued = [asyncio.create_task(post(http, s.url, {"model": "m", "max_tokens": 8, "stream": i == 0,
                                        "messages": [{"role": "user", "content": f"Say {i}"}]})) for i in range(3)]
    async with asyncio.timeout(30):
        while await backend("queued") != 3:
            await asyncio.sleep(0.05)
    assert not long.done()
    os.kill(llama_pid, signal.SIGSEGV)

    status, raw, _ = await long
    events = sse_events(raw)
    terminal = [e.event for e in events if e.event in ("message_stop", "error")]
    assert status == 200 and len(terminal) == 1, terminal  # a clean error or a clean end, never both
    assert sum(e.event == "message_start" for e in events) == 1  # never a second generation in one answer
    for i, task in enumerate(queued):
        status, raw, _ = await task
        assert status == 200, raw
        if i == 0:
            evs = sse_events(raw)
            assert evs[-1].event == "message_stop" and sum(e.event == "message_start" for e in evs) == 1, raw[:3000]
        else:
            assert json.loads(raw)["stop_reason"] in ("max_tokens", "end_turn")
    new_pid = s.pid("llama-primary")
    assert new_pid != llama_pid and s.state("llama-primary") in ("RUNNING", "STARTING")
    assert await s.metric(http, "orchestrator_backend_restarts_total") == restarts_before + 1
    assert s.pid("gateway") == gw_pid  # the gateway itself never restarted


@pytest.mark.real
async def test_killed_gateway_is_restarted_and_up_is_idempotent(stack, http):
    s = stack()
    s.up()
    await wait_health(http, s.url)
    pids = {p: s.pid(p) for p in ("gateway", "llama-primary")}
    assert s.up() == "unchanged"
    assert {p: s.pid(p) for p in pids} == pids  # a second `up` touched nothing
    os.kill(pids["gateway"], signal.SIGKILL)
    t0 = time.time()
    await asyncio.sleep(0.5)
    await wait_health(http, s.url, timeout=120)
    # supervisord restarted it (a broken restart never answers): its time is only reported, a loaded
    # machine's Python start-up can take seconds.
    print(f"gateway back {time.time() - t0:.1f} s after SIGKILL")
    assert s.pid("gateway") != pids["gateway"] and s.pid("llama-primary") == pids["llama-primary"]


@pytest.mark.real
async def test_backend_with_missing_model_is_fatal_and_named(stack, http):
    s = stack(model="/nonexistent/GLM-5.gguf", retries=1)
    with pytest.raises(supervise.SuperviseError, match="llama-primary is FATAL"):
        s.up()
    await wait_health(http, s.url)
    deadline = time.time() + 20
    while time.time() < deadline:
        async with http.post(s.url + "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": [
                {"role": "user", "content": "hi"}]}) as r:
            body = await r.json()
        if "FATAL" in body["error"]["message"]:
            break
        await asyncio.sleep(0.3)
    assert r.status == 529 and body["error"]["type"] == "overloaded_error"
    assert "'primary'" in body["error"]["message"] and "llama-primary.log" in body["error"]["message"]
    view = status_view.render(s.config, s.paths)
    assert "FATAL" in view and "llama-primary.log" in view


@pytest.mark.real
async def test_supervisor_events_tell_the_gateway_at_once(stack, http):
    """With health polling every 600 s, only supervisord's events can tell the gateway
    within a second that its idle backend died, and that it runs again."""
    # 600 s, not 60: the bound below leaves a loaded machine's restart room (40 s) and still can only
    # be met through the events, whenever the last poll happened.
    s = stack(health_interval=600)
    s.up()
    health = await wait_health(http, s.url)
    async with asyncio.timeout(30):
        while health["backends"][0]["state"] != "ready":
            await asyncio.sleep(0.1)
            health = await wait_health(http, s.url)
    old_pid = s.pid("llama-primary")
    assert {p["name"] for p in supervise.processes(s.paths)} >= {"events", "gateway", "llama-primary"}
    os.kill(old_pid, signal.SIGKILL)
    t0 = time.monotonic()
    states = []
    async with asyncio.timeout(60):
        while True:
            b = (await wait_health(http, s.url))["backends"][0]
            states.append(b["state"])
            if b["restarts"] == 1 and b["state"] == "ready":
                break
            await asyncio.sleep(0.05)
    assert "down" in states or "loading" in states  # it was seen gone
    assert time.monotonic() - t0 < 40
    assert await s.metric(http, "orchestrator_backend_restarts_total") == 1
