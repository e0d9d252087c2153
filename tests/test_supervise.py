"""supervisord runs the stack: rendering, and real crashes of the real llama-server."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port, llama_server_binary

from orchestrator.configfile import config_from_dict, load_config
from orchestrator.ops import status as status_view
from orchestrator.ops import supervise
from orchestrator.sse import events as sse_events

ROOT = Path(__file__).parent.parent


def test_render_has_every_program_with_restart_policy_and_absolute_paths(tmp_path):
    config = config_from_dict({"backends": [
        {"name": "primary", "url": "http://127.0.0.1:8080", "start_seconds": 7,
         "command": "{llama_server} --model /m/GLM-5.gguf --port {port} --ctx-size 65536 --parallel 1"},
        {"name": "remote", "url": "https://api.example.test"}]})
    paths = supervise.StackPaths(tmp_path)
    text = supervise.render(config, tmp_path / "o.toml", paths, supervise.Programs("/opt/llama server"))
    assert "[program:llama-primary]" in text and "[program:gateway]" in text
    assert "[program:llama-remote]" not in text  # not ours to run
    assert "command='/opt/llama server' --model /m/GLM-5.gguf --port 8080 --ctx-size 65536" in text
    for line in ("autorestart=true", "stopasgroup=true", "killasgroup=true", "startsecs=7"):
        assert line in text
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("file", "logfile", "pidfile", "directory", "childlogdir")):
            assert value.startswith("/"), line
    assert f"serverurl=unix://{paths.socket}" in text


def test_render_escapes_percent_and_names_unknown_placeholders(tmp_path):
    ok = config_from_dict({"backends": [{"name": "p", "url": "http://h:1", "command": "x --fmt 100%"}]})
    assert "command=x --fmt 100%%" in supervise.render(ok, tmp_path / "c", supervise.StackPaths(tmp_path),
                                                        supervise.Programs(None))
    bad = config_from_dict({"backends": [{"name": "p", "url": "http://h:1", "command": "{nope} x"}]})
    with pytest.raises(supervise.SuperviseError, match="unknown placeholder"):
        supervise.render(bad, tmp_path / "c", supervise.StackPaths(tmp_path), supervise.Programs(None))


def test_default_stack_config_is_valid_and_renders():
    config = load_config(ROOT / "deploy" / "orchestrator.toml")
    text = supervise.render(config, ROOT / "deploy" / "orchestrator.toml",
                            supervise.StackPaths(ROOT), supervise.Programs("/bin/llama-server"))
    assert supervise.default_model() in text and "--port 8080" in text


# ---- real supervisord, real llama-server -------------------------------------------------------

class Stack:
    def __init__(self, root: Path, model: str | None = None, retries: int = 3, health_interval: float = 0.5):
        self.root = root
        self.gw_port, self.llama_port = free_port(), free_port()
        model_arg = model or "{default_model}"
        self.config_path = root / "orchestrator.toml"
        self.config_path.write_text(f"""
[gateway]
port = {self.gw_port}
health_interval_seconds = {health_interval}
[queue]
max_wait_seconds = 120
[[backends]]
name = "primary"
url = "http://127.0.0.1:{self.llama_port}"
command = "{{llama_server}} --model {model_arg} --host {{host}} --port {{port}} --parallel 1 --ctx-size 4096 --metrics --threads 2 --no-webui"
start_seconds = 1
start_retries = {retries}
""")
        self.config = load_config(self.config_path)
        self.paths = supervise.StackPaths(root)
        self.url = f"http://127.0.0.1:{self.gw_port}"

    def up(self) -> str:
        return supervise.up(self.config, self.config_path, self.paths, supervise.Programs(llama_server_binary()),
                            timeout=60)

    def pid(self, program: str) -> int:
        return supervise.rpc(self.paths).getProcessInfo(program)["pid"]

    def state(self, program: str) -> str:
        return supervise.rpc(self.paths).getProcessInfo(program)["statename"]

    def all_pids(self) -> list[int]:
        pids = [p["pid"] for p in supervise.processes(self.paths) if p["pid"]]
        return pids + [int(self.paths.pidfile.read_text())]

    async def metric(self, http, name: str) -> float:
        async with http.get(self.url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    if 'backend="primary"' in line or "{" not in line:
                        return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not exported")


def _gone(pid: int) -> bool:
    return not supervise._alive(pid)


@pytest.fixture
def stack(tmp_path):
    stacks = []

    def make(**kw) -> Stack:
        root = tmp_path / f"stack{len(stacks)}"
        root.mkdir()
        s = Stack(root, **kw)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        down_leaving_nothing(s)


def down_leaving_nothing(s: Stack) -> None:
    """`down`, and every process the stack ran is gone within 20 s."""
    pids = s.all_pids() if supervise.running(s.paths) else []
    supervise.down(s.paths)
    deadline = time.time() + 20
    while not all(_gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "a process of the stack outlived `down`"


async def _wait_health(http, url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            async with http.get(url + "/health") as r:
                if r.status == 200:
                    return await r.json()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("gateway /health did not answer")


@pytest.mark.real
async def test_segv_of_llama_server_loses_no_queued_request(stack, http):
    s = stack()
    assert s.up() == "started"
    await _wait_health(http, s.url)
    llama_pid, gw_pid = s.pid("llama-primary"), s.pid("gateway")
    restarts_before = await s.metric(http, "orchestrator_backend_restarts_total")

    async def post(body):
        async with http.post(s.url + "/v1/messages", json=body) as r:
            return r.status, await r.read()

    long = asyncio.create_task(post({"model": "m", "max_tokens": 400, "stream": True,
                                     "messages": [{"role": "user", "content": "Write a long story about a dragon"}]}))
    async def backend(key):
        async with http.get(s.url + "/health") as r:
            return (await r.json())["backends"][0][key]

    # Wait until the long answer is streaming, then queue three more behind it.
    async with asyncio.timeout(30):
        while await backend("busy") != 1:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    queued = [asyncio.create_task(post({"model": "m", "max_tokens": 8, "stream": i == 0,
                                        "messages": [{"role": "user", "content": f"Say {i}"}]})) for i in range(3)]
    async with asyncio.timeout(30):
        while await backend("queued") != 3:
            await asyncio.sleep(0.05)
    assert not long.done()
    os.kill(llama_pid, signal.SIGSEGV)

    status, raw = await long
    events = sse_events(raw)
    terminal = [e.event for e in events if e.event in ("message_stop", "error")]
    assert status == 200 and len(terminal) == 1, terminal  # a clean error or a clean end, never both
    assert sum(e.event == "message_start" for e in events) == 1  # never a second generation in one answer
    for i, task in enumerate(queued):
        status, raw = await task
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
    await _wait_health(http, s.url)
    pids = {p: s.pid(p) for p in ("gateway", "llama-primary")}
    assert s.up() == "unchanged"
    assert {p: s.pid(p) for p in pids} == pids  # a second `up` touched nothing
    os.kill(pids["gateway"], signal.SIGKILL)
    t0 = time.time()
    await asyncio.sleep(0.5)
    await _wait_health(http, s.url)
    assert time.time() - t0 < 10
    assert s.pid("gateway") != pids["gateway"] and s.pid("llama-primary") == pids["llama-primary"]


@pytest.mark.real
async def test_backend_with_missing_model_is_fatal_and_named(stack, http):
    s = stack(model="/nonexistent/GLM-5.gguf", retries=1)
    with pytest.raises(supervise.SuperviseError, match="llama-primary is FATAL"):
        s.up()
    await _wait_health(http, s.url)
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
    health = await _wait_health(http, s.url)
    async with asyncio.timeout(30):
        while health["backends"][0]["state"] != "ready":
            await asyncio.sleep(0.1)
            health = await _wait_health(http, s.url)
    old_pid = s.pid("llama-primary")
    assert {p["name"] for p in supervise.processes(s.paths)} >= {"events", "gateway", "llama-primary"}
    os.kill(old_pid, signal.SIGKILL)
    t0 = time.monotonic()
    states = []
    async with asyncio.timeout(60):
        while True:
            b = (await _wait_health(http, s.url))["backends"][0]
            states.append(b["state"])
            if b["restarts"] == 1 and b["state"] == "ready":
                break
            await asyncio.sleep(0.05)
    assert "down" in states or "loading" in states  # it was seen gone
    assert time.monotonic() - t0 < 40
    assert await s.metric(http, "orchestrator_backend_restarts_total") == 1
