"""The SSE relay: a backend's stream to the client, whole event by whole event, each in its own bytes.

Exactly one terminal event reaches the client: the backend's `message_stop` or
`error`, or, when the stream breaks a rule or ends without one, an `error` of
ours. Nothing after the terminal event is forwarded. The only changes to what
the backend sent: `message_start`'s model is set back to the client's name, and
llama-server's OpenAI-shaped error event is put in Anthropic's shape. A tool call
whose input is not a JSON object (vLLM's tool parsers let a small model's
`[...]` or `"..."` through) ends the stream with an error of ours before its
`content_block_stop`: a client would run the tool with it, or fail on it.

One event is added: a `message_start` before an answer that lacks one. llama-server writes it
only with its first decoded token's event (server-task.cpp, `n_decoded == 1`), and a first token
that is half a UTF-8 character (a byte-fallback emoji, a random-weight model) is held back, so
the answer starts at `content_block_start`; Anthropic's SDK, Claude Code's, fails such a stream
("Unexpected event order"). Its prompt figures are the engine's own (llama-server's /slots) or,
when the engine cannot tell, 0, and the log says so.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import aiohttp
from aiohttp import web

from .. import sse
from ..engines.upstream import chunks, drain
from ..errors import GatewayError, Overloaded, UpstreamError, UpstreamUnavailable, from_upstream
from .accounting import Ended
from .exchange import Exchange

log = logging.getLogger(__name__)

TERMINAL = ("message_stop", "error")
# What follows a terminal event (normally nothing) is read this long, so the answer counts as
# complete and the slot as free at once.
DRAIN_SECONDS = 1.0
# The engine's look at its own slot, for an answer that left out its prompt figures.
USAGE_TIMEOUT = 5.0


async def relay_stream(ex: Exchange, resp: aiohttp.ClientResponse) -> web.StreamResponse:
    """Forward the exchange's backend's stream to its client; raises UpstreamUnavailable while
    nothing of the answer was relayed (safe to send again), another GatewayError once it was."""
    client, backend, outcome, call = ex.client, ex.backend, ex.outcome, ex.call
    parser = sse.SSEParser()
    rename = ex.model if isinstance(ex.model, str) else None
    stream = chunks(resp, backend.config)
    terminal: str | None = None
    problem: str | None = None
    tool_inputs: dict[Any, list[str]] = {}  # a tool_use block's input_json_delta parts, by its index
    started = False  # a message_start reached the client
    eof = False
    while terminal is None and problem is None and not eof:
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            chunk, eof = b"", True
        except GatewayError as exc:  # reset, payload error: the backend is gone
            why = exc.__cause__.__class__.__name__ if exc.__cause__ is not None else exc.message
            if not call.answered:
                raise UpstreamUnavailable(f"backend {backend.name!r} failed before its first event: {why}") from exc
            backend.health.mark_down(f"stream broken: {why}")
            outcome.status = Ended.STREAM_ERROR
            raise Overloaded(f"backend {backend.name!r} broke off its stream ({why}): did it crash?") from exc
        try:
            blocks = parser.feed(chunk, eof=eof)
        except sse.EventTooLarge as e:
            blocks, problem = [], f"backend {backend.name!r} sent {e}"
        out: list[bytes] = []
        for block in blocks:
            ev = block.event
            if ev is not None:
                data = ev.json()
                if not isinstance(data, dict):
                    problem = (f"backend {backend.name!r} sent a {ev.event!r} event whose data is not a JSON "
                               f"object: {ev.data[:200]!r}")
                    break
                if ev.event == "message_start" and started:
                    continue  # one was added before it: a second would break the client's stream
                if ev.event == "message_start":
                    started = True
                elif not started and ev.event not in ("ping", "error"):
                    start = await _missing_start(ex, rename)
                    outcome.observe_event("message_start", start)
                    out.append(sse.encode("message_start", start))
                    started = True
                outcome.observe_event(ev.event, data)
                problem = _tool_input_problem(ev.event, data, tool_inputs)
                if problem is not None:
                    problem = f"backend {backend.name!r} sent {problem}"
                    break
                if ev.event == "message_start" and rename and _rename(data, rename):
                    block = sse.Block(sse.encode(ev.event, data), ev)
                elif ev.event == "error" and not is_anthropic_error(data):
                    block = sse.Block(sse.encode("error", _as_anthropic_error(data)), ev)
                call.answered = True
            out.append(block.raw)
            if ev is not None and ev.event in TERMINAL:
                terminal = ev.event
                break
        if out:
            await client.write(b"".join(out), resp.headers)
    if terminal is None and problem is None and not call.answered:
        # Nothing of the answer reached the client: safe to send again.
        raise UpstreamUnavailable(f"backend {backend.name!r} closed the stream before its first event")
    if terminal is not None:
        if terminal == "error":
            outcome.status = Ended.STREAM_ERROR
        call.complete = await drain(resp, DRAIN_SECONDS)
        return await client.finish()
    # The backend died mid-answer, ended without message_stop, or broke a rule: the client is told
    # (an SSE error once its stream has begun); a truncated answer must not pass for a whole one.
    outcome.status = Ended.STREAM_ERROR
    if problem is None:
        backend.health.mark_down("stream ended without message_stop")
        raise Overloaded(f"backend {backend.name!r} ended the stream before message_stop (did it crash?)")
    log.warning("%s", problem)
    raise UpstreamError(problem)


async def _missing_start(ex: Exchange, model: str | None) -> dict[str, Any]:
    """The message_start an answer lacked, with the prompt figures its engine gives for it."""
    backend = ex.backend
    try:
        usage = await backend.engine.prompt_usage(USAGE_TIMEOUT)
    except GatewayError as exc:
        log.warning("backend %r: its prompt figures not read: %s", backend.name, exc.message)
        usage = None
    log.warning("backend %r began an answer without message_start: one added, its prompt figures %s",
                backend.name, "from the engine" if usage else "unknown (0)")
    return {"type": "message_start", "message": {
        "id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "content": [],
        "model": model or backend.name, "stop_reason": None, "stop_sequence": None,
        "usage": {**(usage or {"input_tokens": 0, "cache_read_input_tokens": 0}), "output_tokens": 0}}}


def _tool_input_problem(event: str, data: dict[str, Any], parts: dict[Any, list[str]]) -> str | None:
    """Follows each tool_use block's input as it streams; at its end, what is wrong with it (None: a
    JSON object, or no input streamed: its content_block_start's own)."""
    index = data.get("index")
    if event == "content_block_start":
        block = data.get("content_block")
        if isinstance(block, dict) and block.get("type") == "tool_use":
            parts[index] = []
    elif event == "content_block_delta" and index in parts:
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("partial_json"), str):
            parts[index].append(delta["partial_json"])
    elif event == "content_block_stop" and index in parts:
        text = "".join(parts.pop(index))
        try:
            value = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            return f"a tool call whose input is not a JSON object: {text[:200]!r}"
    return None


def _rename(data: dict[str, Any], model: str) -> bool:
    """Set message_start's model to the client's name (llama-server names its GGUF path); True if changed."""
    msg = data.get("message")
    if data.get("type") != "message_start" or not isinstance(msg, dict) or msg.get("model") == model:
        return False
    msg["model"] = model
    return True


def is_anthropic_error(data: dict[str, Any]) -> bool:
    return data.get("type") == "error" and isinstance(data.get("error"), dict)


def _as_anthropic_error(data: dict[str, Any]) -> dict[str, Any]:
    """llama-server's error event carries an OpenAI-shaped error; Claude Code reads Anthropic's."""
    code = data.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return from_upstream(status, json.dumps({"error": data}).encode()).body()
