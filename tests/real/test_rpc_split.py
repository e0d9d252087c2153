"""llama.cpp split across two RPC workers (ggml-rpc-server, built with llama-server by
deploy/install-llama-server.sh), all three supervised, the gateway in front. A worker that dies aborts
its head at the head's next use of it and the head never reconnects (docs/rpc-split.md): the stack
recovers by itself, the worker restarted by supervisord and the head by the gateway, and no request
is lost."""

import asyncio
import os
import signal
import time

import pytest

from orchestrator.engines.local_process import command_line
from orchestrator.sse import events as sse_events
from testkit.client import CLAUDE_PATH, post, sample
from testkit.servers import free_port
from testkit.stack import wait_health

pytestmark = pytest.mark.real

WORKERS = ("rpc-primary-0", "rpc-primary-1")


def split_stack(stack):
    ports = free_port(), free_port()
    s = stack(ctx_size=8192, settings=f'rpc_workers = ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]')
    assert s.up() == "started"
    return s, ports


async def recovered(s, http, head_pid: int, bound: float = 300) -> float:
    """Seconds until the backend is ready again on a new head; the bound only ends a hung test."""
    began = time.monotonic()
    async with asyncio.timeout(bound):
        while True:
            b = await s.backend(http)
            if b["state"] == "ready" and s.state("llama-primary") == "RUNNING" and s.pid() != head_pid \
                    and all(v == "RUNNING" for v in b["rpc_workers"].values()):
                return time.monotonic() - began
            await asyncio.sleep(0.05)


async def test_a_split_serves_claude_codes_request_and_shows_its_workers(stack, http):
    s, ports = split_stack(stack)
    await wait_health(http, s.url)
    b = await s.ready(http)
    assert b["rpc_workers"] == dict.fromkeys(WORKERS, "RUNNING"), b
    assert all(s.state(w) == "RUNNING" for w in WORKERS)
    # The head runs with both workers, and each worker has had the head connect.
    head = command_line(s.pid())
    assert f"--rpc 127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}" in head, head
    assert all("Accepted client connection" in s.paths.log(w).read_text() for w in WORKERS)
    body = {**sample("main-2.1.332.json")["body"], "max_tokens": 64}
    status, raw, _ = await post(http, s.url, body, path=CLAUDE_PATH)
    events = [e.event for e in sse_events(raw)]
    assert status == 200 and events[-1] == "message_stop", raw[-2000:]


async def test_a_worker_killed_while_idle_is_recovered_without_a_request_failing(stack, http):
    s, _ = split_stack(stack)
    await wait_health(http, s.url)
    await s.ready(http)
    head = s.pid()
    os.kill(s.pid(WORKERS[0]), signal.SIGKILL)
    took = await recovered(s, http, head)
    print(f"\nidle worker kill: recovered in {took:.1f} s")
    status, raw, _ = await post(http, s.url, {"model": "m", "max_tokens": 16,
                                              "messages": [{"role": "user", "content": "Say hi"}]})
    assert status == 200, raw


async def test_a_worker_killed_mid_stream_is_one_error_and_the_queued_request_is_answered(stack, http):
    s, _ = split_stack(stack)
    await wait_health(http, s.url)
    await s.ready(http)
    head = s.pid()
    long = {"model": "m", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    async with http.post(s.url + "/v1/messages", json=long) as r:
        assert r.status == 200
        raw, queued = b"", None
        async for chunk in r.content.iter_any():
            raw += chunk
            if queued is None and b"content_block_delta" in raw:
                queued = asyncio.ensure_future(post(http, s.url, {"model": "m", "max_tokens": 16, "messages": [
                    {"role": "user", "content": "Say hi"}]}))
                while (await s.backend(http))["queued"] < 1:
                    await asyncio.sleep(0.02)
                killed = time.monotonic()
                os.kill(s.pid(WORKERS[1]), signal.SIGKILL)
    events = [e.event for e in sse_events(raw)]
    assert sum(e in ("message_stop", "error") for e in events) == 1, events  # one clean end, never both
    status, answer, _ = await queued
    assert status == 200, answer
    print(f"\nmid-stream worker kill: the queued request answered {time.monotonic() - killed:.1f} s later")
    assert s.pid() != head
