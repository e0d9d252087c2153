"""A role "system" message inside `messages` (Claude Code 2.1.332 sends its environment so) folded into the
user message before it for a backend whose chat template renders the prompt (conversation.py's
fold_system_messages, routing.py's folds_system): Qwen3.5's template refuses a system message after the
first (tests/real/test_model_families.py meets it on the real server)."""

from __future__ import annotations

import json

from orchestrator.config import BackendConfig
from orchestrator.conversation import fold_system_messages, folds_system
from orchestrator.request.routing import Rewrites, forwarded_body
from testkit.client import sample

ENV = [{"type": "text", "text": "# Environment\nPrimary working directory: /p"}]


def test_claude_codes_real_request_gets_its_environment_after_the_first_user_message():
    body = sample("main-2.1.332.json")["body"]
    assert [m["role"] for m in body["messages"]] == ["user", "system"]
    folded = fold_system_messages(body)
    first, env = body["messages"]
    assert folded["messages"] == [{**first, "content": [*first["content"], *env["content"]]}]
    assert folded["system"] is body["system"] and folded["tools"] is body["tools"]
    assert [m["role"] for m in body["messages"]] == ["user", "system"]  # the client's body untouched


def test_each_place_a_system_message_can_stand():
    assert fold_system_messages({"messages": [{"role": "user", "content": "hi"}]}) is None
    assert fold_system_messages({"system": "s"}) is None
    # Before any user message: put before the first one's blocks (a string content as its text block).
    folded = fold_system_messages({"messages": [{"role": "system", "content": "env"},
                                                {"role": "user", "content": "hi"}]})
    assert folded["messages"] == [{"role": "user", "content": [{"type": "text", "text": "env"},
                                                               {"type": "text", "text": "hi"}]}]
    # After an assistant turn, with nothing after it: a user message of its own.
    folded = fold_system_messages({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "system", "content": ENV}]})
    assert folded["messages"][1:] == [{"role": "assistant", "content": "b"}, {"role": "user", "content": ENV}]
    # After tool results: a user message of its own (folded in, llama-server would put its text before
    # the results, between the assistant's tool calls and them).
    results = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "hi"}]}
    folded = fold_system_messages({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]}, results, {"role": "system", "content": ENV}]})
    assert folded["messages"][2:] == [results, {"role": "user", "content": ENV}]
    # Two in a row after a user message: both appended, in order.
    folded = fold_system_messages({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "x"},
                                                {"role": "system", "content": "y"}]})
    assert [b["text"] for b in folded["messages"][0]["content"]] == ["a", "x", "y"]


def test_every_turn_folds_the_same_way_so_the_prompt_keeps_its_prefix():
    body = sample("main-2.1.332.json")["body"]
    turn1 = fold_system_messages(body)["messages"]
    later = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": "next"}]}
    assert fold_system_messages(later)["messages"][:1] == turn1


def test_forwarded_bytes_fold_strip_and_clamp_together():
    body = sample("main-2.1.332.json")["body"]
    raw = json.dumps(body).encode()
    sent = json.loads(forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=100, fold_system=True)))
    assert [m["role"] for m in sent["messages"]] == ["user"] and sent["max_tokens"] == 100
    assert sent["system"] == body["system"][1:]  # the billing line dropped
    # Without the fold, the messages are the client's bytes.
    sent = json.loads(forwarded_body(body, raw, Rewrites(strip_billing=True)))
    assert sent["messages"] == body["messages"]


def test_which_backends_get_it():
    def backend(url: str, **kw) -> BackendConfig:
        return BackendConfig(name="b", url=url, **kw)

    assert folds_system(backend("http://127.0.0.1:8080"))           # auto: a server on this machine
    assert folds_system(backend("http://gpu-box:8080", command="x"))  # auto: supervised here
    assert not folds_system(backend("https://api.anthropic.com"))    # auto: a remote API reads it
    assert folds_system(backend("https://api.anthropic.com", system_messages="fold"))
    assert not folds_system(backend("http://127.0.0.1:8080", system_messages="forward"))


async def test_count_tokens_counts_the_body_as_it_would_be_sent(serve_app, upstream):
    from orchestrator.backends.counting import TokenCounter
    from testkit.engine import FakeEngine

    seen = []
    url = await serve_app(FakeEngine(count=lambda body: seen.append(body) or 7).app())
    counter = TokenCounter(upstream, timeout=5)
    body = sample("main-2.1.332.json")["body"]
    assert await counter.count(BackendConfig(name="b", url=url), body) == 7
    assert seen[-1]["messages"] == fold_system_messages(body)["messages"]
    await counter.count(BackendConfig(name="r", url=url, system_messages="forward"), body)
    assert seen[-1]["messages"] == body["messages"]


def test_the_fold_is_spliced_into_the_clients_bytes_and_agrees_with_re_serialising():
    from orchestrator.conversation import strip_billing_header
    from orchestrator.jsonvalues import utf8_json

    body = sample("main-2.1.332.json")["body"]
    for raw in (json.dumps(body).encode(), json.dumps(body, indent=2, ensure_ascii=False).encode()):
        parsed = json.loads(raw)
        sent = forwarded_body(parsed, raw, Rewrites(strip_billing=True, max_tokens=0, fold_system=True))
        oracle = fold_system_messages(strip_billing_header(parsed))
        assert json.loads(sent) == oracle
        # Spliced, not re-serialised: the tools, as the client wrote them, are in what was sent.
        tools_start = raw.index(b'"tools"')
        assert raw[tools_start:tools_start + 5000] in sent and sent != utf8_json(oracle)
    # Where the splice cannot be proven (a system message past the first megabyte, a later member
    # of the same name), the body is re-serialised, and still right.
    far = {**body, "messages": [{"role": "user", "content": "x" * (2 << 20)}, {"role": "system", "content": "env"}]}
    raw = json.dumps(far).encode()
    assert json.loads(forwarded_body(far, raw, Rewrites(strip_billing=False, max_tokens=0, fold_system=True))) == \
        fold_system_messages(far)
    twice = b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ' \
            b'"messages": [{"role": "user", "content": "c"}, {"role": "system", "content": "d"}]}'
    sent = forwarded_body(json.loads(twice), twice, Rewrites(strip_billing=False, max_tokens=0, fold_system=True))
    assert json.loads(sent) == fold_system_messages(json.loads(twice))
