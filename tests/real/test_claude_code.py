"""The real Claude Code CLI (npm @anthropic-ai/claude-code) through the gateway."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from orchestrator.backends.gateway import GATEWAY
from orchestrator.configfile import config_from_dict
from orchestrator.ops import claude_env
from testkit.engine import FakeEngine
from testkit.scripts import echo_hi, replying
from testkit.servers import ROOT, free_port

pytestmark = pytest.mark.real


# The newest release tested besides the default (2.1.197, what npm picks on Node 20): its
# engines field asks for Node >= 22, yet it runs on 20 (a native binary).
NEWER = "2.1.332"


def claude_binary(version: str | None = None) -> str:
    path = os.environ.get("ORCHESTRATOR_CLAUDE")
    if path and version is None:
        return path
    if version is not None:
        # Installed by the same script a fresh machine runs, into that version's own cache folder.
        env = {k: v for k, v in os.environ.items() if k != "CLAUDE_BIN"} | {"CLAUDE_CODE_VERSION": version}
        out = subprocess.run([str(ROOT / "deploy" / "install-claude-code.sh")], check=False, capture_output=True,
                             text=True, env=env)
        assert out.returncode == 0, out.stderr
        binary = out.stdout.strip().splitlines()[-1]
        said = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
        assert said.startswith(f"{version} "), f"{binary} is {said!r}, not {version}"
        return binary
    out = subprocess.run([str(ROOT / "deploy" / "install-claude-code.sh")], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def claude_home(tmp_path):
    """A throwaway HOME and project folder: onboarding done, folder trusted, no network lookups."""
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True,
        "customApiKeyResponses": {"approved": ["none"], "rejected": []},
        "projects": {str(project): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}},
    }))
    return home, project


def claude_env_for(config, health, home: Path, *, nonessential: bool = False) -> dict:
    env = {"PATH": f"{Path(shutil.which('node')).parent}:/usr/bin:/bin", "HOME": str(home), "TERM": "xterm-256color",
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
           **claude_env.claude_environment(config, health)}
    if nonessential:
        del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]
    return env


def key_headers(config) -> dict:
    return {"x-api-key": config.gateway.api_key} if config.gateway.api_key else {}


async def start_for_claude(gateway, http, raw: dict):
    base, app = await gateway(raw)
    host, port = base.removeprefix("http://").split(":")
    config = config_from_dict({**raw, "gateway": {**raw.get("gateway", {}), "host": host, "port": int(port)}})
    # Until the first health check (and its /props read, which Claude Code's environment is made from)
    # is done: waited for, not 100 polls of 50 ms that a loaded machine could outlast.
    async with asyncio.timeout(60):
        while True:
            async with http.get(base + "/health", headers=key_headers(config)) as r:
                health = await r.json()
            if health["backends"][0]["state"] == "ready":
                break
            await asyncio.sleep(0.05)
    return base, app[GATEWAY], config, health


async def run_claude(args: list[str], env: dict, cwd: Path, timeout: float = 600,
                     version: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(claude_binary(version), *args, cwd=cwd, env=env,
                                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def _metric(http, base, name, headers=None, **labels) -> float:
    async with http.get(base + "/metrics", headers=headers or {}) as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("key,version", [(None, None), ("a-key-for-claude-code", None), (None, NEWER)],
                         ids=["no-key", "with-key", f"no-key-{NEWER}"])
async def test_print_mode_through_gateway_to_real_llama_server(llama_short, gateway, http, claude_home, key,
                                                               version):
    """With a key configured too: `orchestrator claude` hands it over and Claude Code gets in.
    And with the newest release tested, which npm does not pick on Node 20."""
    home, project = claude_home
    llama = llama_short
    base, gw, config, health = await start_for_claude(gateway, http, {
        "gateway": {"api_key": key} if key else {},
        "backends": [{"name": "primary", "url": llama.url, "max_output_tokens": 256}]})
    assert health["backends"][0]["n_ctx"] == 8192
    env = claude_env_for(config, health, home)
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "8192"
    code, out, err = await run_claude(["-p", "Say hello"], env, project, version=version)
    assert code == 0, (out, err)
    assert out.strip(), "Claude Code printed no answer"
    assert await _metric(http, base, "orchestrator_requests_total", key_headers(config),
                         route="main", status="200") >= 1
    assert await _metric(http, base, "orchestrator_rejections_total", key_headers(config),
                         reason="unauthorized") == 0
    assert gw.backends["primary"].queue.busy == 0


# ---- a fake upstream that asks for a tool, for the round trip ----------------------------------

async def test_tool_round_trip(gateway, serve_app, http, claude_home):
    home, project = claude_home
    fake = FakeEngine(script=echo_hi, die_on_overlap=False)
    url = await serve_app(fake.app())
    base, gw, config, health = await start_for_claude(gateway, http, {"backends": [{"name": "primary", "url": url}]})
    env = claude_env_for(config, health, home)
    code, out, err = await run_claude(["-p", "Run echo hi", "--allowedTools", "Bash(echo hi)"], env, project,
                                      timeout=300)
    assert code == 0, (out, err)
    assert "Done." in out
    follow_ups = [r for r in fake.requests if any(
        isinstance(m.get("content"), list) and any(b.get("type") == "tool_result" for b in m["content"])
        for m in r["messages"])]
    assert follow_ups, [r["messages"][-1] for r in fake.requests]
    result = next(b for m in follow_ups[0]["messages"] if isinstance(m.get("content"), list)
                  for b in m["content"] if b.get("type") == "tool_result")
    assert "hi" in json.dumps(result["content"])


async def test_backend_restart_while_claude_code_waits(gateway, http, claude_home):
    """The backend dies under the first main request and comes back 3 s later on the
    same port: the request waits in the gateway (with pings) and the turn completes."""
    home, project = claude_home
    port = free_port()
    first, second = (FakeEngine(script=echo_hi, die_on_overlap=False) for _ in range(2))
    runners = []

    async def serve(fake):
        # A short shutdown: the "crash" must not wait for the hanging handler.
        runner = web.AppRunner(fake.app(), handler_cancellation=True, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        runners.append(runner)
        return runner

    first_runner = await serve(first)
    died = asyncio.Event()

    async def die(body):
        if body.get("tools"):  # the main request: the "server" crashes under it
            died.set()
            await asyncio.sleep(3600)

    first.on_request = die
    base, gw, config, health = await start_for_claude(gateway, http, {
        "gateway": {"ping_interval_seconds": 0.5},
        "backends": [{"name": "primary", "url": f"http://127.0.0.1:{port}"}]})
    env = claude_env_for(config, health, home)
    run = asyncio.create_task(run_claude(["-p", "Say hello"], env, project, timeout=300))
    await asyncio.wait_for(died.wait(), 120)
    await first_runner.shutdown()
    await first_runner.cleanup()
    runners.remove(first_runner)
    async with asyncio.timeout(60):  # health polls every 0.2 s: down soon, however loaded the machine
        while gw.backends["primary"].health.state.value != "down":
            await asyncio.sleep(0.05)
    await serve(second)
    code, out, err = await run
    for r in runners:
        await r.cleanup()
    assert code == 0, (out, err)
    assert "Done." in out
    assert any(r.get("tools") for r in second.requests)  # sent again after the restart
    assert gw.backends["primary"].queue.busy == 0


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


async def test_interactive_two_turns_in_tmux(llama_short, gateway, http, claude_home):
    """With non-essential traffic on (so the title call happens): both turns answer, the
    title never reaches the primary, and the primary never has two requests at once."""
    assert shutil.which("tmux"), "tmux is needed (apt-get install tmux)"
    home, project = claude_home
    llama = llama_short
    base, gw, config, health = await start_for_claude(gateway, http, {
        "backends": [{"name": "primary", "url": llama.url, "max_output_tokens": 256}]})
    env = claude_env_for(config, health, home, nonessential=True)
    session = f"orch-test-{os.getpid()}"
    command = " ".join(["env", "-i", *(f"{k}={json.dumps(v)}" for k, v in env.items()), claude_binary()])
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(project), command)

    seen: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def watch_llama():
        while not stop.is_set():
            async with http.get(llama.url + "/metrics") as r:
                text = await r.text()
            vals = [float(re.search(rf"^llamacpp:{n} (\S+)$", text, re.M).group(1))
                    for n in ("requests_processing", "requests_deferred")]
            seen.append((vals[0], vals[1]))
            await asyncio.sleep(0.05)

    async def screen() -> str:
        return await asyncio.to_thread(tmux, "capture-pane", "-p", "-t", session, "-S", "-500")

    async def turn(text: str, main_before: float) -> None:
        await asyncio.to_thread(tmux, "send-keys", "-t", session, text, "Enter")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            done = await _metric(http, base, "orchestrator_requests_total", route="main")
            idle = gw.backends["primary"].queue.busy == 0 and gw.backends["primary"].queue.depth == 0
            if done > main_before and idle and "esc to interrupt" not in await screen():
                return
        raise AssertionError(f"turn {text!r} did not finish:\n{await screen()}")

    watcher = asyncio.create_task(watch_llama())
    try:
        deadline = time.monotonic() + 60
        while "? for shortcuts" not in await screen():
            assert time.monotonic() < deadline, await screen()
            await asyncio.sleep(0.5)
        await turn("Say hello", 0)
        after_first = await _metric(http, base, "orchestrator_requests_total", route="main")
        await turn("What is two plus two", after_first)
        text = await screen()
    finally:
        stop.set()
        await watcher
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    # Both turns got an answer on screen (a bullet after each prompt), and no error.
    first, second = text.index("Say hello"), text.index("What is two plus two")
    assert "●" in text[first:second] and "●" in text[second:], text
    assert "API Error" not in text, text
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="200") >= 2
    assert await _metric(http, base, "orchestrator_synthetic_responses_total", kind="title") >= 1
    assert await _metric(http, base, "orchestrator_requests_total", route="background") == 0
    assert seen and max(p + d for p, d in seen) <= 1


# ---- a session resumed later is the same conversation to the gateway --------------------------

@pytest.mark.parametrize("version", [None, NEWER])
async def test_a_resumed_session_keeps_its_conversation_key(gateway, serve_app, http, claude_home, version):
    """`claude --resume` sends the session's id again and its history: its turn has the conversation key
    of the session's earlier turns, so its KV save (parking, a crash's restore) is found again."""
    home, project = claude_home
    fake = FakeEngine(script=replying("Hello again."), die_on_overlap=False)
    url = await serve_app(fake.app())
    base, gw, config, health = await start_for_claude(gateway, http, {"backends": [{"name": "primary", "url": url}]})
    env = claude_env_for(config, health, home)
    code, out, err = await run_claude(["-p", "Say hi", "--output-format", "json"], env, project, timeout=300,
                                      version=version)
    assert code == 0, (out, err)
    session = json.loads(out)["session_id"]
    first = gw.misses.snapshot("primary")["recent"]
    code, out, err = await run_claude(["-p", "--resume", session, "Say hi again"], env, project, timeout=300,
                                      version=version)
    assert code == 0, (out, err)
    turns = gw.misses.snapshot("primary")["recent"]
    assert len(first) >= 1 and len(turns) > len(first), turns
    assert turns[-1]["conversation"] == first[0]["conversation"], turns
    assert turns[-1]["reason"] != "new", turns
    # A session of its own (a new `claude -p`) is another conversation.
    code, out, err = await run_claude(["-p", "Say hi"], env, project, timeout=300, version=version)
    assert code == 0, (out, err)
    other = gw.misses.snapshot("primary")["recent"][-1]
    assert other["conversation"] != first[0]["conversation"] and other["reason"] == "new"


async def test_the_system_message_folds_the_same_way_every_turn_of_a_tool_loop(gateway, serve_app, http, claude_home):
    """Claude Code 2.1.332 sends its environment as a system message inside `messages`; a server on this
    machine gets it folded into a user message (conversation.fold_system_messages). Turn 2 of a real tool
    loop must still extend turn 1's prompt as forwarded, or every turn's cache misses from its start."""
    from orchestrator.conversation import without_cache_control

    home, project = claude_home
    fake = FakeEngine(script=echo_hi, die_on_overlap=False)
    url = await serve_app(fake.app())
    base, gw, config, health = await start_for_claude(gateway, http, {"backends": [{"name": "primary", "url": url}]})
    code, out, err = await run_claude(["-p", "Run echo hi", "--allowedTools", "Bash(echo hi)"],
                                      claude_env_for(config, health, home), project, timeout=300, version=NEWER)
    assert code == 0, (out, err)
    mains = [r for r in fake.requests if r.get("tools")]
    print("\nroles as forwarded:", [[m["role"] for m in r["messages"]] for r in mains])
    assert len(mains) >= 2 and all(m["role"] != "system" for r in mains for m in r["messages"])
    first, second = mains[0]["messages"], mains[1]["messages"]
    # 2.1.332 sends it second, after the first user message, on every turn: folded into that message,
    # turn 2's first message is turn 1's, environment and all, and the prompt cache reads it.
    assert any(b.get("text", "").startswith("# Environment") for b in first[0]["content"]), first[0]
    # (Claude Code moves its cache_control mark to the newest message: llama-server's template reads none.)
    assert without_cache_control(second[0]) == without_cache_control(first[0]), (first[0], second[0])
    assert second[1]["role"] == "assistant", second[:2]
