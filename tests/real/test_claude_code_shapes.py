"""What Claude Code sends, old and new, replayed exactly through the gateway.

tests/fixtures holds real captured requests (method, path, query, headers, body) from three
releases: 2.0.77 (the topic check, which continues a `{` prefill, and the warm-up), 2.1.197 (what
npm installs on Node 20: count_tokens and the max_tokens=1 count probe) and 2.1.332 (the newest: a
main turn with a `role: "system"` message among its messages, and the title request on the main
model's name asking for JSON through `output_config.format`). Each is sent as Claude Code sent it: its own headers, its
path with `?beta=true`, its body in JSON.stringify's form. Other tests send these bodies through
aiohttp's `json=` (other bytes, none of the captured headers) or rewrite them first; these
check each kind end to end as it arrives, against a fake upstream that records what it got and
against the real llama-server.
"""

import asyncio
import json
import time

import aiohttp
import jsonschema
import pytest
from conftest import gateway_with

from orchestrator.backends.gateway import GATEWAY
from orchestrator.conversation import fold_system_messages
from orchestrator.engines.upstream import FORWARDED
from orchestrator.sse import events as sse_events
from testkit.client import sample
from testkit.engine import FakeEngine

# Claude Code's own framing, not part of what it says: aiohttp sets its own (and main and
# warm-up were edited after capture, their home path anonymised, so their Content-Length is stale).
NOT_REPLAYED = {"content-length", "connection", "host"}
# The samples that were not edited after capture: their bytes are the captured ones exactly.
UNEDITED = ("title-2.1.332.json", "topic-2.0.77.json", "count_tokens-2.1.197.json", "count-probe-2.1.197.json")


def stringify(body: dict) -> bytes:
    """A body as JSON.stringify writes it: compact, non-ASCII as UTF-8."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def replay(http, base: str, name: str, timeout: float = 120, **changes) -> tuple[int, bytes, float]:
    """Send a captured request as it was sent, `changes` applied to its body: (status, answer, when done)."""
    s = sample(name)
    headers = {k: v for k, v in s["headers"].items() if k.lower() not in NOT_REPLAYED}
    url = base + s["path"] + (f"?{s['query']}" if s["query"] else "")
    async with http.request(s["method"], url, data=stringify({**s["body"], **changes}), headers=headers,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.read(), time.monotonic()


def streamed_text(raw: bytes) -> tuple[list[str], str, dict]:
    """(event names, the text of every text delta, the message_delta) of an SSE answer."""
    events = [e for e in sse_events(raw) if e.event != "ping"]
    text = "".join(e.json()["delta"].get("text", "") for e in events if e.event == "content_block_delta")
    delta = next((e.json() for e in events if e.event == "message_delta"), {})
    return [e.event for e in events], text, delta


def answer_text(raw: bytes, stream: bool) -> tuple[str, str]:
    """(text, stop_reason) of an answer, streamed or not, checked to be a complete Messages answer."""
    if stream:
        names, text, delta = streamed_text(raw)
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
        assert "error" not in names, raw[-500:]
        return text, delta["delta"]["stop_reason"]
    msg = json.loads(raw)
    assert msg["type"] == "message" and msg["role"] == "assistant", msg
    return "".join(b.get("text", "") for b in msg["content"]), msg["stop_reason"]


@pytest.mark.parametrize("name", UNEDITED)
def test_replayed_bytes_are_the_captured_ones(name):
    """The replay is faithful: for every sample taken as it was, JSON.stringify's form has
    exactly the captured Content-Length."""
    s = sample(name)
    assert len(stringify(s["body"])) == int(s["headers"]["Content-Length"])


# ---- against the fake upstream ---------------------------------------------------------------

async def test_main_2_1_332_reaches_the_primary_with_only_its_billing_line_gone(gateway, serve_app, http):
    from orchestrator.backends.gateway import GATEWAY

    up = FakeEngine()  # it keeps each body's bytes as they arrived too
    # Its system message forwarded as sent (the default folds it for a server on this machine:
    # tests/request/test_system_messages.py): the splice's bytes are what this checks.
    base, app = await gateway({"backends": [{"name": "primary", "url": await serve_app(up.app()),
                                             "system_messages": "forward"}]})
    gw = app[GATEWAY]
    s = sample("main-2.1.332.json")
    status, raw, _ = await replay(http, base, "main-2.1.332.json")
    assert status == 200
    text, stop = answer_text(raw, stream=True)
    assert text == "w0 w1 w2 w3 w4 " and stop == "end_turn"
    assert gw.backends["primary"].queue.acquired_total == 1 and up.paths == ["/v1/messages?beta=true"]

    # Byte for byte what Claude Code sent, less the first system block (the billing line, which
    # changes on every request): the system message, safeguards, thinking.display and the rest untouched.
    billing = s["body"]["system"][0]
    assert billing["text"].startswith("x-anthropic-billing-header: cc_version=2.1.332")
    sent = stringify(s["body"])
    assert up.raw == [sent.replace(stringify(billing) + b",", b"", 1)]
    got = up.requests[0]
    assert [m["role"] for m in got["messages"]] == ["user", "system"]
    assert got["safeguards"] == s["body"]["safeguards"] and got["thinking"] == {"type": "adaptive",
                                                                                "display": "updates"}
    # The captured headers a backend needs (upstream.FORWARDED), with their values; none of the rest
    # (Claude Code's session id, the SDK's x-stainless-* telemetry, x-app).
    forwarded = {k.lower(): v for k, v in up.headers[0].items()}
    kept = {k.lower(): v for k, v in s["headers"].items() if k.lower() in FORWARDED}
    assert set(kept) == {"accept", "content-type", "anthropic-version", "anthropic-beta"}
    assert kept.items() <= forwarded.items(), set(kept.items()) - set(forwarded.items())
    assert not any(k.startswith("x-stainless") or k in ("x-claude-code-session-id", "x-app") for k in forwarded)
    assert "x-api-key" not in forwarded and forwarded["accept-encoding"] == "identity"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
async def test_title_2_1_332_is_json_valid_against_its_own_schema(gateway, fake, http, stream):
    """2.1.332's title request carries the main model's name: only its shape keeps it off the primary."""
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    body = sample("title-2.1.332.json")["body"]
    assert body["model"] == "local-model" and body["stream"] is True
    status, raw, _ = await replay(http, base, "title-2.1.332.json", stream=stream)
    assert status == 200
    text, stop = answer_text(raw, stream)
    answer = json.loads(text)
    jsonschema.validate(answer, body["output_config"]["format"]["schema"])
    # What its system prompt asks for: two to five words, the first letter a capital.
    assert 1 <= len(answer["title"].split()) <= 5 and answer["title"][0].isupper(), answer
    assert stop == "end_turn"
    assert f.requests == [] and f.count_calls == 0 and gw.backends["primary"].queue.acquired_total == 0


@pytest.mark.parametrize("model", ["as-captured", "main-model"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
async def test_topic_2_0_77_continues_its_prefill_into_the_json_it_asks_for(gateway, fake, http, stream, model):
    """The answer follows the client's `{`; on the main model's name too, as 2.1.332 sends its title."""
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    changes = {"stream": stream} | ({"model": "local-model"} if model == "main-model" else {})
    status, raw, _ = await replay(http, base, "topic-2.0.77.json", **changes)
    assert status == 200
    text, stop = answer_text(raw, stream)
    assert not text.startswith("{")  # Claude Code puts its own "{" in front
    answer = json.loads("{" + text)
    # Its system prompt: "'isNewTopic' (boolean) and 'title' (string, or null if isNewTopic is
    # false). Only include these fields", the title of 2-3 words.
    assert set(answer) == {"isNewTopic", "title"} and isinstance(answer["isNewTopic"], bool)
    if answer["isNewTopic"]:
        assert isinstance(answer["title"], str) and 1 <= len(answer["title"].split()) <= 3, answer
    else:
        assert answer["title"] is None
    assert stop == "end_turn"
    assert f.requests == [] and gw.backends["primary"].queue.acquired_total == 0


@pytest.mark.parametrize("model", ["as-captured", "main-model"])
async def test_warmup_2_0_77_is_answered_without_the_primary(gateway, fake, http, model):
    """A warm-up carries every tool (37 KB): sent on, it would cost a full prefill of the main slot."""
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    changes = {"model": "local-model"} if model == "main-model" else {}
    status, raw, _ = await replay(http, base, "warmup-2.0.77.json", **changes)
    assert status == 200
    text, stop = answer_text(raw, stream=True)
    assert text and stop == "end_turn"
    start = sse_events(raw)[0].json()["message"]
    assert start["model"] == (changes.get("model") or sample("warmup-2.0.77.json")["body"]["model"])
    assert f.requests == [] and gw.backends["primary"].queue.acquired_total == 0


# ---- against the real llama-server -----------------------------------------------------------

async def _direct_count(http, llama_url: str, body: dict) -> int:
    async with http.post(llama_url + "/v1/messages/count_tokens", data=stringify(body),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        return (await r.json())["input_tokens"]


@pytest.mark.real
async def test_every_shape_on_the_real_server_while_main_2_1_332_holds_its_slot(llama_short, gateway, http):
    """SmolLM2 with the default stack's grammar: 2.1.332's main turn, system message and all, is
    prefilled and answered by the real server, and while it holds the only slot count_tokens, the
    count probe, the title, the topic check and the warm-up are all answered at once, the counts
    being the server's own."""
    llama = llama_short
    # The prompt is what is tested: the answer is cut at a few tokens (the gateway's documented
    # clamp) so the test lasts about its prefill of 4,000 tokens (10-60 s on 2 busy cores).
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url, "max_output_tokens": 8}]})
    gw = app[GATEWAY]
    queue = gw.backends["primary"].queue
    main = asyncio.create_task(replay(http, base, "main-2.1.332.json", timeout=600))
    async with asyncio.timeout(60):  # polled: the bound only for a request that never takes the slot
        while queue.busy != 1:
            await asyncio.sleep(0.01)
    assert queue.busy == 1, "the main request never took the slot"

    # Meanwhile: every other shape, each as sent.
    answers = {}
    for name, kind in (("count_tokens-2.1.197.json", "count"), ("count-probe-2.1.197.json", "probe"),
                            ("title-2.1.332.json", "title"), ("topic-2.0.77.json", "topic"),
                            ("warmup-2.0.77.json", "warmup")):
        status, raw, done = await replay(http, base, name)
        assert status == 200, (name, raw[:300])
        answers[kind] = (raw, done)
        assert queue.depth == 0 and queue.busy == 1
    m_status, m_raw, m_done = await main
    assert m_status == 200, m_raw[-500:]
    assert all(done < m_done for _, done in answers.values()), "an answer waited behind the main turn"
    assert queue.acquired_total == 1 and queue.busy == 0

    # The counts are the server's (an estimate differs): count_tokens as sent, and the probe's usage.
    count = json.loads(answers["count"][0])
    assert count == {"input_tokens": await _direct_count(http, llama.url, sample("count_tokens-2.1.197.json")["body"])}
    probe = json.loads(answers["probe"][0])
    assert probe["stop_reason"] == "max_tokens"
    assert probe["usage"]["input_tokens"] == await _direct_count(http, llama.url,
                                                                 sample("count-probe-2.1.197.json")["body"])
    jsonschema.validate(json.loads(answer_text(answers["title"][0], True)[0]),
                        sample("title-2.1.332.json")["body"]["output_config"]["format"]["schema"])
    assert json.loads("{" + answer_text(answers["topic"][0], True)[0])["isNewTopic"] is True
    assert answer_text(answers["warmup"][0], True)[0]

    # The main turn: a whole answer, and a prompt of every token the server counts for the body
    # it got, the system message's among them (folded into the first user message).
    text, stop = answer_text(m_raw, stream=True)
    assert text and stop in ("end_turn", "max_tokens"), (text, stop)
    usage = next(e for e in sse_events(m_raw) if e.event == "message_start").json()["message"]["usage"]
    prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    main_body = sample("main-2.1.332.json")["body"]
    stripped = {**main_body, "system": main_body["system"][1:], "max_tokens": 8}
    # The documented rewrites: the billing line dropped, the system message folded into the user's.
    forwarded = fold_system_messages(stripped)
    without_system_message = {**stripped, "messages": [m for m in stripped["messages"] if m["role"] != "system"]}
    assert prompt == await _direct_count(http, llama.url, forwarded)
    assert prompt > await _direct_count(http, llama.url, without_system_message) + 1000
