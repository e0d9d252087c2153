"""A role "system" message inside `messages` (Claude Code 2.1.332 sends its environment so) folded into the
user message before it for a backend whose chat template renders the prompt (conversation.py's
fold_system_messages, routing.py's folds_system): Qwen3.5's template refuses a system message after the
first (tests/real/test_model_families.py meets it on the real server)."""

from __future__ import annotations

import json

from orchestrator.config import BackendConfig
from orchestrator.conversation import fold_system_messages, folds_system
from orchestrator.request.routing import forwarded_body
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
    sent = json.loads(forwarded_body(body, raw, strip_billing=True, max_output_tokens=100, fold_system=True))
    assert [m["role"] for m in sent["messages"]] == ["user"] and sent["max_tokens"] == 100
    assert sent["system"] == body["system"][1:]  # the billing line dropped
    # Without the fold, the messages are the client's bytes.
    sent = json.loads(forwarded_body(body, raw, strip_billing=True, max_output_tokens=0))
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
