"""Title and topic requests on a background model: its answer when valid, else the synthetic one."""

import asyncio
import functools
import json

import jsonschema
import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.request.background import TOPIC_SCHEMA, Reply, ask_for, check_reply
from orchestrator.request.routing import Shape
from orchestrator.sse import events as sse_events
from testkit.client import CLAUDE_PATH, post as post_to, sample
from testkit.engine import FakeEngine

# Every request here goes where Claude Code sends it.
post = functools.partial(post_to, path=CLAUDE_PATH)

TITLE = sample("title-2.1.332.json")["body"]
TOPIC = sample("topic-2.0.77.json")["body"]
TITLE_SCHEMA = TITLE["output_config"]["format"]["schema"]
MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


def test_title_asks_llama_servers_openai_endpoint_with_a_bounded_schema():
    ask = ask_for(TITLE, Shape.TITLE, "json_schema")
    sent = json.loads(ask.data)
    assert ask.path == "/v1/chat/completions" and not ask.continues_prefill
    schema = sent["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["title"]["maxLength"] > 0 and schema["required"] == ["title"]
    assert sent["stream"] is False and sent["max_tokens"] <= 256
    system = sent["messages"][0]
    assert system["role"] == "system" and "x-anthropic-billing-header" not in system["content"]
    assert "naming a coding session" in system["content"]
    assert sent["messages"][-1]["role"] == "user" and "<session>" in sent["messages"][-1]["content"]


def test_topic_asks_for_the_whole_object_without_the_prefill():
    ask = ask_for(TOPIC, Shape.TOPIC, "json_schema")
    sent = json.loads(ask.data)
    assert ask.continues_prefill and ask.schema == TOPIC_SCHEMA
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    reply = Reply('{"isNewTopic": true, "title": "String reversal"}', "end_turn", 50, 12)
    wrong, text = check_reply(reply, ask, "json_schema")
    # Claude Code glues its "{" in front of what it gets.
    assert wrong is None and json.loads("{" + text) == {"isNewTopic": True, "title": "String reversal"}


def test_messages_form_continues_the_prefill_itself():
    ask = ask_for(TOPIC, Shape.TOPIC, "messages")
    sent = json.loads(ask.data)
    assert ask.path == "/v1/messages" and sent["messages"] == TOPIC["messages"] and sent["stream"] is False
    wrong, text = check_reply(Reply('"isNewTopic": false, "title": null}', "end_turn", 5, 5), ask, "messages")
    assert wrong is None and text == '"isNewTopic": false, "title": null}'


@pytest.mark.parametrize("text,why", [
    ('{"title": 5}', "type"), ('{"title": "a", "extra": 1}', "no room"), ('{"title": "cut', "not JSON"),
    ("Here is a title: Foo", "not JSON"), ("{}", "required")])
def test_invalid_answers_are_named(text, why):
    ask = ask_for(TITLE, Shape.TITLE, "json_schema")
    wrong, _ = check_reply(Reply(text, "end_turn", 1, 1), ask, "json_schema")
    assert wrong is not None and why in wrong


async def _two_backends(gateway, serve_app, small: FakeEngine, **routing):
    big = FakeEngine()
    big_url, small_url = await serve_app(big.app()), await serve_app(small.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": big_url},
                                            {"name": "small", "url": small_url, "role": "background"}],
                               "routing": {"background": "small", **routing}})
    return base, app[GATEWAY], big


def _text(raw: bytes, stream: bool) -> str:
    if stream:
        return "".join(e.json()["delta"]["text"] for e in sse_events(raw) if e.event == "content_block_delta")
    return json.loads(raw)["content"][0]["text"]


def _answers(gw, result, shape="title") -> float:
    return gw.metrics.background_answers.labels("small", shape, result)._value.get()


@pytest.mark.parametrize("stream", [True, False])
async def test_the_small_models_valid_title_is_sent(gateway, serve_app, http, stream):
    small = FakeEngine(chat_answer='{"title": "Python string reversal"}')
    base, gw, big = await _two_backends(gateway, serve_app, small)
    status, raw, _ = await post(http, base, {**TITLE, "stream": stream})
    assert status == 200
    if stream:
        assert [e.event for e in sse_events(raw)][-1] == "message_stop"
    answer = json.loads(_text(raw, stream))
    assert answer == {"title": "Python string reversal"}
    jsonschema.validate(answer, TITLE_SCHEMA)
    assert small.paths == ["/v1/chat/completions"] and big.requests == []
    assert _answers(gw, "model") == 1 and gw.metrics.synthetic.labels("title")._value.get() == 0
    assert gw.metrics.requests.labels("background", "small", "200")._value.get() == 1
    assert gw.metrics.prompt_tokens.labels("small", "miss")._value.get() == 42


@pytest.mark.parametrize("answer,finish,result", [
    ('{"name": "x"}', "stop", "invalid"), ('{"title": "Py', "length", "invalid"), (None, "stop", "failed")])
async def test_an_invalid_or_failed_answer_falls_back_to_the_synthetic_one(gateway, serve_app, http, answer, finish,
                                                                           result):
    small = FakeEngine(chat_answer=answer, chat_finish=finish, mode="error500" if answer is None else "ok")
    base, gw, big = await _two_backends(gateway, serve_app, small)
    status, raw, _ = await post(http, base, {**TITLE, "stream": True})
    assert status == 200
    jsonschema.validate(json.loads(_text(raw, True)), TITLE_SCHEMA)
    assert _answers(gw, result) == 1 and _answers(gw, "model") == 0
    assert gw.metrics.synthetic.labels("title")._value.get() == 1 and big.requests == []


async def test_a_late_answer_falls_back_and_its_slot_waits_for_the_model(gateway, serve_app, http):
    small = FakeEngine(mode="stall")
    base, gw, big = await _two_backends(gateway, serve_app, small, background_timeout_seconds=0.3)
    started = asyncio.get_running_loop().time()
    status, raw, _ = await post(http, base, {**TOPIC})
    # Answered after the 0.3 s timeout, not after the stalled model's hour: a bound wide enough for
    # any loaded machine.
    assert status == 200 and asyncio.get_running_loop().time() - started < 30
    full = json.loads("{" + _text(raw, True))
    jsonschema.validate(full, TOPIC_SCHEMA)
    assert _answers(gw, "timeout", "topic") == 1
    # The stalled model still holds its only slot: the next topic request is not sent on top of it.
    status, raw, _ = await post(http, base, {**TOPIC})
    assert status == 200 and _answers(gw, "timeout", "topic") == 2
    assert len(small.requests) == 1 and small.max_in_flight == 1


async def test_main_requests_never_wait_for_a_slow_small_model(gateway, serve_app, http):
    small = FakeEngine()
    small.gate.clear()  # its answers held until the main request is answered: no clock to beat
    base, gw, big = await _two_backends(gateway, serve_app, small)
    titles = [asyncio.create_task(post(http, base, {**TITLE, "stream": True})) for _ in range(3)]
    queue = gw.backends["small"].queue
    async with asyncio.timeout(60):  # the titles are in the small model and its queue
        while not (small.in_flight == 1 and queue.depth == 2):
            await asyncio.sleep(0.01)
    status, _, _ = await post(http, base, {**MAIN, "stream": True})
    # Answered while the small model had finished nothing: it waited for none of the titles.
    assert status == 200 and small.generations_finished == 0
    assert not any(t.done() for t in titles)
    small.gate.set()
    for t in titles:
        assert (await t)[0] == 200
    assert all(r["model"] == "big-model" for r in big.requests) and len(big.requests) == 1


async def test_messages_form_sends_the_request_as_it_is_and_checks_the_answer(gateway, serve_app, http):
    small = FakeEngine()  # answers "w0 w1 ...": not the JSON asked for
    base, gw, _ = await _two_backends(gateway, serve_app, small, background_format="messages")
    status, raw, _ = await post(http, base, {**TITLE, "stream": False})
    assert status == 200 and small.paths == ["/v1/messages"]
    jsonschema.validate(json.loads(_text(raw, False)), TITLE_SCHEMA)
    assert _answers(gw, "invalid") == 1


async def test_a_deeply_nested_title_answer_falls_back_to_the_synthetic_title(gateway, serve_app, http):
    """A background answer nested too deeply for the parser is an invalid answer (the synthetic title
    is sent), not a 400 for a request whose body was fine."""
    small = FakeEngine(chat_answer="[" * 100_000 + "]" * 100_000)
    big = FakeEngine()
    base, app = await gateway({"backends": [{"name": "primary", "url": await serve_app(big.app())},
                                            {"name": "small", "url": await serve_app(small.app()),
                                             "role": "background"}],
                               "routing": {"background": "small"}})
    status, raw, _ = await post(http, base, {**TITLE, "stream": False})
    assert status == 200, f"{status} {raw[:300]!r}"
    jsonschema.validate(json.loads(json.loads(raw)["content"][0]["text"]), TITLE_SCHEMA)


def test_a_title_answer_with_nan_is_not_sent_as_valid_json():
    """NaN and Infinity are Python's, not JSON: an answer holding them is invalid (Claude Code's
    JSON.parse would throw on it), even where the schema leaves the value untyped."""
    body = {**TITLE, "output_config": {"format": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}}}}
    ask = ask_for(body, Shape.TITLE, "messages")
    wrong, text = check_reply(Reply('{"title": "Fix the parser", "confidence": NaN}', "end_turn", 5, 5), ask,
                              "messages")
    if wrong is None:
        def strict(c):
            raise ValueError(f"{c} is not JSON")

        try:
            json.loads(text, parse_constant=strict)
        except ValueError as e:
            pytest.fail(f"accepted as valid and sent: {text!r} ({e})")



async def test_a_title_schema_with_a_pattern_is_work_for_the_main_model(gateway, serve_app, http):
    """Claude Code's title schema has no `pattern`: a request that adds one (here `^(a+)+$`, minutes of
    backtracking for a checker) is another client's work. It goes to the main model, never to the
    small one nor through the gateway's check of a small model's answer."""
    hostile = {**TITLE, "output_config": {"format": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"title": {"type": "string", "pattern": "^(a+)+$"}},
        "required": ["title"], "additionalProperties": False}}}}
    small = FakeEngine(chat_answer=json.dumps({"title": "a" * 32 + "!"}))
    base, gw, big = await _two_backends(gateway, serve_app, small)
    status, _, _ = await post(http, base, {**hostile, "stream": True})
    assert status == 200 and big.generations_finished == 1 and small.generations_started == 0
    assert _answers(gw, "invalid") == 0


async def test_a_const_that_breaks_its_own_pattern_is_refused_at_once(gateway, serve_app, http):
    """llama.cpp's grammar follows `const` and ignores `pattern`: the model would be forced to write
    the string the check refuses (slowly, with a backtracking engine). The request is refused."""
    hostile = {**TITLE, "output_config": {"format": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"title": {"type": "string", "const": "a" * 40 + "!",
                                                   "pattern": "^(a+)+$"}},
        "required": ["title"]}}}}
    small = FakeEngine()
    base, gw, big = await _two_backends(gateway, serve_app, small)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, raw, _ = await post(http, base, hostile)
    # Refused without checking: a backtracking check of 41 characters would take days, not 30 s.
    assert status == 400 and loop.time() - started < 30
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error" and "properties.title.const" in error["message"]
    assert small.requests == [] and big.requests == []
