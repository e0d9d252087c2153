"""Through the gateway to the real llama-server (built from source) running SmolLM2-135M."""

import asyncio
import functools
import copy
import json
import re

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.client import CLAUDE_PATH, sample
from testkit.client import post as post_to

# Every request here goes where Claude Code sends it.
post = functools.partial(post_to, path=CLAUDE_PATH)

pytestmark = pytest.mark.real


def _events(raw: bytes):
    return sse_events(raw)


def claude_main(turn_text: str, *, cch: str = "7a0", tools: int = 3, max_tokens: int = 8,
                stream: bool = True) -> dict:
    """A main turn built like Claude Code's: billing header, system prompt, tools, system message."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.332.{cch}; cc_entrypoint=cli;"
    body["tools"] = body["tools"][:tools]
    body["max_tokens"] = max_tokens
    body["stream"] = stream
    body["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": turn_text}]}
    return body


async def _load(http, url) -> tuple[float, float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()

    def val(name):
        m = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return val("requests_processing"), val("requests_deferred")


async def _watch(http, url, stop: asyncio.Event, seen: list):
    while not stop.is_set():
        seen.append(await _load(http, url))
        await asyncio.sleep(0.02)


async def test_stream_and_non_stream_have_the_same_shape_as_direct(llama, gateway, http):
    base, _ = await gateway({"backends": [{"name": "primary", "url": llama.url}]})
    body = {"model": "claude-sonnet-x", "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]}
    for stream in (False, True):
        _, direct, _ = await post(http, llama.url, {**body, "stream": stream})
        status, through, _ = await post(http, base, {**body, "stream": stream})
        assert status == 200
        if stream:
            d, t = _events(direct), _events(through)
            assert [e.event for e in t][:2] == ["message_start", "content_block_start"]
            assert t[-1].event == "message_stop" and t[-2].event == "message_delta"
            assert {e.event for e in t} <= {e.event for e in d} | {"ping"}
            assert t[0].json()["message"]["model"] == "claude-sonnet-x"
        else:
            d, t = json.loads(direct), json.loads(through)
            assert set(d) == set(t) and t["type"] == "message" and t["content"][0]["type"] == "text"
            assert t["model"] == "claude-sonnet-x" and t["usage"]["output_tokens"] > 0


async def test_watcher_sees_overlap_when_the_server_is_flooded_directly(llama, http):
    """Proves the next test's watcher can fail: three requests sent straight to the server overlap."""
    stop, seen = asyncio.Event(), []
    watcher = asyncio.create_task(_watch(http, llama.url, stop, seen))
    body = {"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": "Count to twenty"}]}
    await asyncio.gather(*[post(http, llama.url, body) for _ in range(3)])
    stop.set()
    await watcher
    assert max(p + d for p, d in seen) > 1


async def test_claude_code_burst_never_puts_two_generations_on_the_server(llama, gateway, http):
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url}]})
    gw = app[GATEWAY]
    # Warm the prompt cache so the burst's main turns share the long prefix.
    status, _, _ = await post(http, base, claude_main("hello"))
    assert status == 200
    requests = []
    for i in range(5):
        requests.append(("main", "/v1/messages?beta=true", claude_main(f"question {i}", cch=f"{i:03x}")))
    for i in range(5):
        title = copy.deepcopy(sample("title-2.1.332.json")["body"])
        title["messages"][0]["content"][0]["text"] = f"<session>\nfix the parser bug number {i}\n</session>"
        requests.append(("title", "/v1/messages?beta=true", title))
    for _ in range(5):
        requests.append(("topic", "/v1/messages?beta=true", sample("topic-2.0.77.json")["body"]))
    ct = sample("count_tokens-2.1.197.json")["body"]
    tools = sample("main-2.1.332.json")["body"]["tools"]
    for i in range(25):
        requests.append(("count", "/v1/messages/count_tokens?beta=true", {**ct, "tools": [tools[i % len(tools)]]}))
    assert len(requests) == 40

    stop, seen = asyncio.Event(), []
    watcher = asyncio.create_task(_watch(http, llama.url, stop, seen))
    results = await asyncio.gather(*[post(http, base, body, path=path) for _, path, body in requests])
    stop.set()
    await watcher

    for (kind, _, _), (status, raw, _) in zip(requests, results):
        assert status == 200, (kind, raw[:300])
        if kind == "count":
            assert json.loads(raw)["input_tokens"] > 100
            continue
        # A request that waits past gateway.ping_interval_seconds gets pings first (a loaded machine).
        events = [e for e in _events(raw) if e.event != "ping"]
        assert events[0].event == "message_start" and events[-1].event == "message_stop", kind
        text = "".join((e.json().get("delta") or {}).get("text", "") for e in events
                       if e.event == "content_block_delta")
        if kind == "title":
            assert json.loads(text)["title"].startswith("Parser bug number")
        if kind == "topic":
            assert json.loads("{" + text)["isNewTopic"] is True
    assert len(seen) > 10
    assert max(p + d for p, d in seen) <= 1, "the server saw more than one request at once"
    assert gw.backends["primary"].queue.acquired_total == 6 and gw.backends["primary"].queue.busy == 0


async def test_prompt_cache_hits_through_gateway_despite_billing_header(llama, gateway, http):
    base, _ = await gateway({"backends": [{"name": "primary", "url": llama.url}]})
    # Directly, a different billing line per request breaks the cache at its first block.
    await post(http, llama.url, claude_main("cache probe", cch="aaa", stream=False))
    _, raw, _ = await post(http, llama.url, claude_main("cache probe", cch="bbb", stream=False))
    direct = json.loads(raw)["usage"]
    # Through the gateway the line is dropped, so the whole prefix is reused.
    await post(http, base, claude_main("cache probe", cch="ccc", stream=False))
    status, raw, _ = await post(http, base, claude_main("cache probe", cch="ddd", stream=False))
    through = json.loads(raw)["usage"]
    assert status == 200
    total = through["input_tokens"] + through["cache_read_input_tokens"]
    assert through["cache_read_input_tokens"] > 0.9 * total
    assert direct["cache_read_input_tokens"] < 0.1 * (direct["input_tokens"] + direct["cache_read_input_tokens"])
    # And the gateway's own metrics saw the hit.
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    hit = float(re.search(r'orchestrator_prompt_tokens_total\{backend="primary",cache="hit"\} (\S+)', text).group(1))
    assert hit >= through["cache_read_input_tokens"]


async def test_count_tokens_is_the_backends_own_count(llama, gateway, http):
    base, _ = await gateway({"backends": [{"name": "primary", "url": llama.url}]})
    body = sample("count_tokens-2.1.197.json")["body"]
    _, direct, _ = await post(http, llama.url, body, path="/v1/messages/count_tokens")
    _, through, _ = await post(http, base, body, path="/v1/messages/count_tokens?beta=true")
    assert json.loads(through) == json.loads(direct)
