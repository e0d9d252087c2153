"""`make up SMALL=1` for real: two llama-servers under supervisord, Claude Code's background
requests on the small one (its titles model-made and schema-valid), main turns on the primary."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
from test_claude_code import claude_binary, claude_env_for, claude_home, tmux  # noqa: F401 (fixture)

from orchestrator.configfile import load_config
from orchestrator.ops import supervise
from testkit.client import post, sample
from testkit.servers import ROOT, free_port, llama_server_binary

pytestmark = pytest.mark.real

SMALL_CONFIG = ROOT / "deploy" / "orchestrator.small.toml"


class SmallStack:
    """deploy/orchestrator.small.toml as shipped, on free ports in a folder of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.gw, self.primary, self.small, self.prom = free_port(), free_port(), free_port(), free_port()
        text = SMALL_CONFIG.read_text()
        for old, new in (("port = 9090", f"port = {self.gw}"), ("127.0.0.1:8080", f"127.0.0.1:{self.primary}"),
                         ("127.0.0.1:8081", f"127.0.0.1:{self.small}"), ('dir = ".."', 'dir = "."'),
                         ("deploy/short-answers.gbnf", str(ROOT / "deploy" / "short-answers.gbnf")),
                         # The shipped 20 s is a person's wait for a title; a small model on one thread of a
                         # loaded 2-core machine can take longer, and these tests check where titles go and
                         # that they are valid, not how fast: a wait no loaded machine reaches.
                         ("background_timeout_seconds = 20", "background_timeout_seconds = 600")):
            assert old in text, old
            text = text.replace(old, new)
        text += f'prometheus_listen = "127.0.0.1:{self.prom}"\nprometheus_scrape_interval = "1s"\n'
        self.config_path = root / "orchestrator.toml"
        self.config_path.write_text(text)
        self.config = load_config(self.config_path)
        self.paths = supervise.StackPaths(root)
        self.url = f"http://127.0.0.1:{self.gw}"

    def up(self) -> str:
        prometheus = shutil.which("prometheus")
        assert prometheus, "prometheus is not installed: deploy/ensure-tools.sh (run by make test) installs it"
        return supervise.up(self.config, self.config_path, self.paths,
                            supervise.Programs(llama_server_binary(), prometheus), timeout=90)

    def down(self) -> None:
        supervise.down(self.paths)


@pytest.fixture
def small_stack(tmp_path):
    s = SmallStack(tmp_path)
    try:
        yield s
    finally:
        s.down()


async def _ready(http, s: SmallStack) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with http.get(s.url + "/health") as r:
                health = await r.json()
            if all(b["state"] == "ready" for b in health["backends"]):
                return health
        except Exception:  # noqa: BLE001 - still starting
            pass
        await asyncio.sleep(0.3)
    raise AssertionError("the small stack did not become ready")


async def _metrics(http, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        return await r.text()


def _sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) \
                and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_claude_code_titles_come_from_the_small_model_and_turns_from_the_primary(small_stack, http,
                                                                                         claude_home):
    s = small_stack
    assert shutil.which("tmux"), "tmux is needed (apt-get install tmux)"
    assert s.up() == "started"
    health = await _ready(http, s)
    assert [(b["name"], b["role"]) for b in health["backends"]] == [("primary", "main"), ("small", "background")]
    home, project = claude_home
    # Non-essential traffic on, so Claude Code asks for a session title.
    env = claude_env_for(s.config, health, home, nonessential=True)
    session = f"orch-small-{os.getpid()}"
    command = " ".join(["env", "-i", *(f"{k}={json.dumps(v)}" for k, v in env.items()), claude_binary()])
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(project), command)

    async def screen() -> str:
        return await asyncio.to_thread(tmux, "capture-pane", "-p", "-t", session, "-S", "-500")

    async def turn(text: str) -> None:
        first = await _metrics(http, s.url)
        before = _sum(first, "orchestrator_requests_total", route="main")
        baseline = _sum(first, "orchestrator_requests_total") + _sum(first, "orchestrator_slots_busy") \
            + _sum(first, "orchestrator_queue_depth")
        # The text, then Enter on its own: typed in one burst, Claude Code can take the Enter as part of
        # a paste and leave the prompt unsent; if nothing was sent 10 s later, Enter again.
        await asyncio.to_thread(tmux, "send-keys", "-t", session, "-l", text)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(tmux, "send-keys", "-t", session, "Enter")
        pressed = time.monotonic()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            m = await _metrics(http, s.url)
            sent = _sum(m, "orchestrator_requests_total") + _sum(m, "orchestrator_slots_busy") \
                + _sum(m, "orchestrator_queue_depth")
            if sent == baseline and time.monotonic() - pressed > 10 and f"❯ {text}" in await screen():
                await asyncio.to_thread(tmux, "send-keys", "-t", session, "Enter")
                pressed = time.monotonic()
            idle = _sum(m, "orchestrator_slots_busy", backend="primary") == 0 \
                and _sum(m, "orchestrator_queue_depth", backend="primary") == 0
            if _sum(m, "orchestrator_requests_total", route="main") > before and idle \
                    and "esc to interrupt" not in await screen():
                return
        raise AssertionError(f"turn {text!r} did not finish:\n{await screen()}")

    try:
        deadline = time.monotonic() + 60
        while "? for shortcuts" not in await screen():
            assert time.monotonic() < deadline, await screen()
            await asyncio.sleep(0.5)
        await turn("Write a python function that reverses a string")
        await turn("Now make it reverse the words instead")
        # The title request runs beside the first turn; give a slow one its time.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = await _metrics(http, s.url)
            if _sum(m, "orchestrator_background_answers_total", shape="title") >= 1:
                break
            await asyncio.sleep(1)
        text = await screen()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    assert "API Error" not in text, text
    m = await _metrics(http, s.url)
    # Titles were asked of the small model and its answers were valid (result="model"), never replaced.
    model_titles = _sum(m, "orchestrator_background_answers_total", shape="title", result="model")
    assert model_titles >= 1, [ln for ln in m.splitlines() if "background_answers_total{" in ln]
    assert _sum(m, "orchestrator_synthetic_responses_total", kind="title") == 0
    assert _sum(m, "orchestrator_requests_total", route="main", backend="primary", status="200") >= 2
    assert _sum(m, "orchestrator_requests_total", route="background", backend="small") >= model_titles
    # Nothing of the background reached the primary: it generated exactly the tokens of the main turns.
    primary = await _metrics(http, f"http://127.0.0.1:{s.primary}")
    small = await _metrics(http, f"http://127.0.0.1:{s.small}")
    assert _sum(primary, "llamacpp:tokens_predicted_total") == _sum(m, "orchestrator_output_tokens_total",
                                                                   backend="primary")
    assert _sum(small, "llamacpp:tokens_predicted_total") == _sum(m, "orchestrator_output_tokens_total",
                                                                 backend="small") > 0
    # Prometheus scrapes both servers.
    deadline = time.monotonic() + 30
    up: set[str] = set()
    while time.monotonic() < deadline and up != {"primary", "small"}:
        async with http.get(f"http://127.0.0.1:{s.prom}/api/v1/query",
                            params={"query": 'up{job="llama-server"} == 1'}) as r:
            up = {x["metric"]["backend"] for x in (await r.json())["data"]["result"]}
        await asyncio.sleep(0.5)
    assert up == {"primary", "small"}
    # Each program has its own log.
    logs = {p.name for p in s.paths.log_dir.glob("llama-*.log")}
    assert {"llama-primary.log", "llama-small.log"} <= logs


async def test_main_requests_never_wait_behind_a_busy_small_model(small_stack, http):
    s = small_stack
    s.up()
    await _ready(http, s)
    title = sample("title-2.1.332.json")["body"]
    main = {"model": "local-model", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "Say hi"}]}

    # Four titles at once: one on the small model's only slot, three waiting for it.
    titles = [asyncio.create_task(post(http, s.url, {**title, "stream": i % 2 == 0})) for i in range(4)]
    deadline = time.monotonic() + 30
    while _sum(await _metrics(http, s.url), "orchestrator_queue_depth", backend="small") < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    status, *_ = await post(http, s.url, main)
    assert status == 200
    m = await _metrics(http, s.url)
    # The main request was granted the primary's slot at once: within 0.1 s (microseconds here, room for a
    # loaded machine's pauses; the 1 ms bucket was a race with them), not after a title on the small model.
    assert _sum(m, "orchestrator_queue_wait_seconds_bucket", backend="primary", priority="main", le="0.1") == 1
    # (Whether titles still waited once the main answer ended is the machine's speed, not the gateway's: a
    # busy run's loaded machine let the small model finish all three first.)
    schema = title["output_config"]["format"]["schema"]
    for t in titles:
        status, raw, _ = await t
        assert status == 200
        if raw.startswith(b"{"):
            text = json.loads(raw)["content"][0]["text"]
        else:
            text = "".join(json.loads(line[6:])["delta"]["text"] for line in raw.decode().splitlines()
                           if line.startswith("data: ") and '"text_delta"' in line)
        jsonschema.validate(json.loads(text), schema)
    m = await _metrics(http, s.url)
    results = {r: _sum(m, "orchestrator_background_answers_total", shape="title", result=r)
               for r in ("model", "invalid", "timeout", "failed", "busy")}
    assert sum(results.values()) == 4, results
    assert results["model"] >= 1, results
    assert re.search(r'orchestrator_requests_total\{backend="primary",route="main",status="200"\} 1\.0', m)
