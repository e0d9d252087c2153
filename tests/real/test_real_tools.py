"""Tool calls through the gateway to the real llama-server, with llama.cpp's tool-capable chat templates.

A byte-recording HTTP pass-through sits between the gateway and the server, so the test compares what
the client got with what the server sent, event for event: the `tool_use` block must arrive as the
server wrote it (the only documented rewrite of an answer is message_start's `model`).

SmolLM2-135M was never taught a tool-call syntax. `tool_choice` any/tool becomes llama-server's
"required", whose grammar still lets text come before the template's call marker, so the model writes
prose until max_tokens and never calls. Each forced request therefore ends with an assistant prefill
of the marker (`<tool_call>\n`, which the Messages API allows); from there the grammar makes the call
valid JSON for the tool's schema, and the server's tool-call parser turns it into a `tool_use` block.
As SmolLM2 then writes call after call (the templates allow parallel calls, and llama-server's
/v1/messages has no way to turn them off), the call's end tag is a stop sequence: llama-server ends
the turn there with stop_reason `tool_use`. A real tool-calling model needs neither.

Templates tried with SmolLM2, a forced call and the prefill (llama.cpp 11434.0.0, models/templates):
- NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use, Qwen-Qwen2.5-7B-Instruct: JSON calls
  (`{"name": ..., "arguments": {...}}`); the JSON grammar ends the arguments, stop_reason `tool_use`.
- GLM-4.6: a `tool_use` block comes out, but the model goes on into a second call and ends at
  max_tokens (no `tool_use` stop): left out.
- Qwen3-Coder, GLM-4.7-Flash: XML arguments (`<parameter=command>...`, `<arg_value>...`) are free
  text up to a closing tag SmolLM2 never writes: the block comes out with empty input at max_tokens.
  Left out; a real Qwen3-Coder or GLM writes the closing tags.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gateway_with

from orchestrator import sse
from testkit.client import CLAUDE_PATH, post, sample
from testkit.proxy import Proxy
from testkit.servers import ROOT, LlamaServer

pytestmark = pytest.mark.real

TEMPLATES = ["NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja"]
TOOLS = ("Bash", "Read", "Write")
PREFILL = "<tool_call>\n"
MODEL = "claude-sonnet-local"


def templates_dir() -> Path:
    """llama.cpp's models/templates of the binary's version (kept by its build, else fetched once)."""
    path = os.environ.get("ORCHESTRATOR_LLAMA_TEMPLATES")
    if path:
        return Path(path)
    out = subprocess.run([str(ROOT / "deploy" / "llama-templates.sh")], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=TEMPLATES, ids=[t.removesuffix(".jinja") for t in TEMPLATES])
def tool_llama(request, tmp_path_factory):
    template = templates_dir() / request.param
    assert template.is_file(), template
    server = LlamaServer(tmp_path_factory.mktemp("llama-tools"), ("--jinja", "--chat-template-file", str(template)))
    server.start()
    yield server
    server.stop()


async def through_recorder(tool_llama, serve_app, gateway):
    # Every /v1/messages exchange kept: the body the server got, its answer's bytes as they came.
    recorder = Proxy(tool_llama.url)
    # No gateway pings: a slow prefill must not add events the server never sent.
    base, _ = await gateway_with(gateway, await serve_app(recorder.app()), ping_interval_seconds=0)
    return base, recorder


def claude_code_turn(tool_choice: dict, *, stream: bool) -> dict:
    """A Claude Code main request (billing line, system blocks, its tools, the system-role environment
    message), trimmed to fit SmolLM2's 8192 context, forcing a tool call."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["model"] = MODEL
    body["system"][2]["text"] = body["system"][2]["text"][:600]
    tools = {t["name"]: t for t in body["tools"]}
    body["tools"] = [{**tools[n], "description": tools[n]["description"][:120]} for n in TOOLS]
    user, environment = body["messages"]
    user["content"][-1]["text"] = "Run `echo hi` with the Bash tool."
    environment["content"][0]["text"] = environment["content"][0]["text"][:400]
    body["messages"] = [user, environment, {"role": "assistant", "content": PREFILL}]
    # The tool's schema ends the call; this ends the turn after it (else SmolLM2 writes call after call).
    body.update(max_tokens=120, temperature=0, stream=stream, tool_choice=tool_choice, stop_sequences=["</tool_call>"])
    return body


def follow_up(turn: dict, tool_use: dict) -> dict:
    """The next request of Claude Code: the call (without the prefill) and its result; no tool_choice."""
    body = copy.deepcopy(turn)
    del body["tool_choice"], body["stop_sequences"]
    body["messages"][-1] = {"role": "assistant", "content": [tool_use]}
    body["messages"].append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_use["id"], "content": "hi\n"}]})
    body.update(max_tokens=8, stream=True)
    return body


async def answered(http, base: str, body: dict) -> bytes:
    status, raw, _ = await post(http, base, body, path=CLAUDE_PATH)
    assert status == 200, raw[:500]
    return raw


def blocks(raw: bytes) -> list[sse.Block]:
    return sse.SSEParser(max_event_bytes=len(raw) + 1).feed(raw, eof=True)


def assert_relayed_unchanged(client: bytes, server: bytes) -> list[sse.Event]:
    """The client's stream is the server's, block for block, but for message_start's model."""
    c, s = blocks(client), blocks(server)
    assert [b.event.event if b.event else None for b in c] == [b.event.event if b.event else None for b in s]
    starts = [i for i, b in enumerate(s) if b.event is not None and b.event.event == "message_start"]
    assert len(starts) == 1, s
    for i, (got, sent) in enumerate(zip(c, s)):
        if i == starts[0]:
            start = sent.event.json()
            start["message"]["model"] = MODEL
            assert got.event.json() == start
        else:
            assert got.raw == sent.raw, i
    return [b.event for b in c if b.event is not None]


def tool_use_of(events: list[sse.Event]) -> dict:
    """The one tool_use block of a stream, its input assembled from the input_json_delta events."""
    data = [(e.event, e.json()) for e in events]
    starts = [d for kind, d in data if kind == "content_block_start" and d["content_block"]["type"] == "tool_use"]
    assert len(starts) >= 1, data
    index, block = starts[0]["index"], starts[0]["content_block"]
    partial = [d["delta"]["partial_json"] for kind, d in data if kind == "content_block_delta"
               and d["index"] == index and d["delta"]["type"] == "input_json_delta"]
    assert partial, data
    stop = [d for kind, d in data if kind == "message_delta"][-1]
    assert stop["delta"]["stop_reason"] == "tool_use", stop
    return {"type": "tool_use", "id": block["id"], "name": block["name"], "input": json.loads("".join(partial))}


async def test_streamed_tool_call_and_its_result_pass_unchanged(tool_llama, serve_app, gateway, http):
    base, recorder = await through_recorder(tool_llama, serve_app, gateway)
    turn = claude_code_turn({"type": "tool", "name": "Bash"}, stream=True)
    client = await answered(http, base, turn)
    (sent, server), = recorder.exchanges
    # The request reached the server with its tools and tool_choice as the client wrote them.
    assert sent["tools"] == turn["tools"] and sent["tool_choice"] == turn["tool_choice"]
    tool_use = tool_use_of(assert_relayed_unchanged(client, server))
    # llama-server maps {"type": "tool"} to "required": any of the tools, not necessarily the named one.
    assert tool_use["name"] in TOOLS and isinstance(tool_use["input"], dict) and tool_use["input"]

    client = await answered(http, base, follow_up(turn, tool_use))
    (sent, server) = recorder.exchanges[1]
    assert sent["messages"][-1]["content"][0]["type"] == "tool_result"
    events = assert_relayed_unchanged(client, server)
    assert [e.event for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2].json()["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    text = "".join(e.json()["delta"].get("text", "") for e in events if e.event == "content_block_delta")
    assert text.strip(), "the tool result was not answered"


async def test_non_streamed_tool_call_is_the_servers(tool_llama, serve_app, gateway, http):
    base, recorder = await through_recorder(tool_llama, serve_app, gateway)
    client = json.loads(await answered(http, base, claude_code_turn({"type": "any"}, stream=False)))
    (_, server), = recorder.exchanges
    server = json.loads(server)
    assert client == {**server, "model": MODEL}
    assert client["stop_reason"] == "tool_use"
    calls = [b for b in client["content"] if b["type"] == "tool_use"]
    assert calls and calls == [b for b in server["content"] if b["type"] == "tool_use"]
    assert calls[0]["name"] in TOOLS and calls[0]["input"]
