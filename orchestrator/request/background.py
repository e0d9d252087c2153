"""Title and topic requests on the background model: its answer, valid for what was asked, or none.

Claude Code fails a turn whose title or topic answer is not the JSON it asked
for, and a small model left to itself often writes something else. So such a
request goes to the background backend with its schema (llama-server enforces a
JSON schema as a grammar on /v1/chat/completions; its /v1/messages ignores
one), and the answer is checked against the schema. Anything that is not a
valid answer in time (invalid, late, failed, queue full) comes back as None,
for the caller to send the synthetic answer instead. Other background requests
(warm-ups, Haiku-named work with tools) are forwarded as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..backends.gateway import Gateway
from ..conversation import strip_billing_header
from ..engines.upstream import backend_auth, read_whole
from ..errors import GatewayError, Overloaded
from ..jsonvalues import is_int, reject_constant, utf8_json
from . import synthetic
from .accounting import Outcome, record
from .release import in_slot
from .routing import Route, Shape, text_of
from .schemas import bounded, problem

log = logging.getLogger(__name__)

STRUCTURED = (Shape.TITLE, Shape.TOPIC)



def _topic(is_new: bool, title: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"isNewTopic": {"const": is_new}, "title": title},
            "required": ["isNewTopic", "title"], "additionalProperties": False}


# What Claude Code's topic request asks for in words ("'isNewTopic' (boolean) and
# 'title' (string, or null if isNewTopic is false)"); it carries no schema of its own.
TOPIC_SCHEMA = {"anyOf": [_topic(True, {"type": "string", "minLength": 1}), _topic(False, {"type": "null"})]}
# A bounded schema's answer fits easily; Claude Code asks for 32000.
MAX_ANSWER_TOKENS = 256
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Ask:
    """The request for the background backend, and how to read its answer."""

    path: str
    data: bytes
    schema: dict[str, Any]
    # Topic requests end in an assistant prefill "{" that the client glues in
    # front of the answer: the answer sent back is the JSON without its "{".
    continues_prefill: bool


def wanted_schema(body: dict[str, Any], shape: Shape) -> dict[str, Any]:
    if shape is Shape.TOPIC:
        return TOPIC_SCHEMA
    return body["output_config"]["format"]["schema"]


def _prefill(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    return last.get("role") == "assistant" and text_of(last.get("content")).strip() == "{"


def ask_for(body: dict[str, Any], shape: Shape, fmt: str, max_output_tokens: int = 0) -> Ask:
    schema = wanted_schema(body, shape)
    prefill = shape is Shape.TOPIC and _prefill(body)
    caps = [MAX_ANSWER_TOKENS, body.get("max_tokens") or MAX_ANSWER_TOKENS, max_output_tokens or MAX_ANSWER_TOKENS]
    max_tokens = min(caps)
    stripped = strip_billing_header(body) or body
    if fmt == "messages":
        out = {**stripped, "stream": False, "max_tokens": max_tokens}
        return Ask("/v1/messages", utf8_json(out), schema, prefill)
    messages = []
    system = text_of(stripped.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    turns = stripped.get("messages") or []
    for msg in turns[:-1] if prefill else turns:
        if isinstance(msg, dict) and msg.get("role") in ("user", "assistant", "system"):
            messages.append({"role": msg["role"], "content": text_of(msg.get("content"))})
    payload: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": bounded(schema)}},
    }
    for key in ("temperature", "top_p", "top_k"):
        if key in body:
            payload[key] = body[key]
    return Ask("/v1/chat/completions", utf8_json(payload), schema, prefill)


@dataclass
class Reply:
    text: str
    stop_reason: str
    input_tokens: int
    output_tokens: int


def read_reply(raw: bytes, fmt: str) -> Reply:
    """The text and usage of an OpenAI chat completion or an Anthropic message; ValueError if neither."""
    msg = json.loads(raw)
    if fmt == "messages":
        if not isinstance(msg, dict) or msg.get("type") != "message" or not isinstance(msg.get("content"), list):
            raise ValueError("not an Anthropic message")
        usage = msg.get("usage") if isinstance(msg.get("usage"), dict) else {}
        return Reply(text_of(msg["content"]), str(msg.get("stop_reason") or "end_turn"),
                     _int(usage.get("input_tokens")), _int(usage.get("output_tokens")))
    try:
        choice = msg["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("not an OpenAI chat completion") from None
    if not isinstance(text, str):
        raise ValueError("the completion has no text content")
    usage = msg.get("usage") if isinstance(msg.get("usage"), dict) else {}
    stop = "max_tokens" if choice.get("finish_reason") == "length" else "end_turn"
    return Reply(text, stop, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


def _int(v: Any) -> int:
    return v if is_int(v) else 0


def check_reply(reply: Reply, ask: Ask, fmt: str) -> tuple[str | None, str]:
    """(what is wrong, or None; the text to send the client)."""
    # In "messages" form the backend itself continued the "{" prefill; the
    # chat form asked for the whole object.
    full = "{" + reply.text if ask.continues_prefill and fmt == "messages" else reply.text.strip()
    try:
        # NaN and Infinity are Python's, not JSON: the client's JSON.parse would throw on them.
        value = json.loads(full, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return f"not JSON: {full[:120]!r}", ""
    try:
        wrong = problem(value, ask.schema)
    except RecursionError:  # a recursive schema ($ref) followed down a deeply nested answer
        wrong = "nested too deeply to check"
    if wrong is not None:
        return wrong, ""
    if ask.continues_prefill:
        return None, full.lstrip()[1:]
    return None, full


async def ask(gw: Gateway, body: dict[str, Any], route: Route,
              arrived: float) -> tuple[synthetic.Made, int] | None:
    """The background model's valid answer and its prompt tokens, or None (the metrics say why)."""
    backend = gw.config.backend(route.backends[0])
    fmt = gw.config.routing.background_format
    request = ask_for(body, route.shape, fmt, backend.max_output_tokens)
    answers = gw.metrics.background_answers
    outcome = Outcome(backend.name, status=200)
    try:
        async with asyncio.timeout(gw.config.routing.background_timeout_seconds):
            raw = await _exchange(gw, route, request, outcome)
    except TimeoutError:
        answers.labels(backend.name, route.shape.value, "timeout").inc()
        log.warning("background %s: no %s answer within routing.background_timeout_seconds = %gs; "
                    "sending the synthetic one", backend.name, route.shape.value,
                    gw.config.routing.background_timeout_seconds)
        return None
    except Overloaded as e:
        answers.labels(backend.name, route.shape.value, "busy").inc()
        log.warning("background %s: %s; sending the synthetic %s answer", backend.name, e.message,
                    route.shape.value)
        return None
    except GatewayError as e:
        answers.labels(backend.name, route.shape.value, "failed").inc()
        log.warning("background %s failed (%s); sending the synthetic %s answer", backend.name, e.message,
                    route.shape.value)
        return None
    try:
        reply = read_reply(raw, fmt)
    except (ValueError, RecursionError) as e:
        answers.labels(backend.name, route.shape.value, "failed").inc()
        log.warning("background %s answered 200 with something unreadable (%s); sending the synthetic %s answer",
                    backend.name, e, route.shape.value)
        return None
    gw.metrics.prompt_tokens.labels(backend.name, "miss").inc(reply.input_tokens)
    gw.metrics.output_tokens.labels(backend.name).inc(reply.output_tokens)
    wrong, text = check_reply(reply, request, fmt)
    if wrong is not None:
        answers.labels(backend.name, route.shape.value, "invalid").inc()
        log.warning("background %s: its %s answer is not valid for the request (%s); sending the synthetic one",
                    backend.name, route.shape.value, wrong)
        return None
    answers.labels(backend.name, route.shape.value, "model").inc()
    outcome.first_content = time.monotonic()
    outcome.input_tokens, outcome.output_tokens = reply.input_tokens, reply.output_tokens
    # Tokens were counted above, for valid and invalid answers alike.
    record(gw, "background", outcome, arrived, count_tokens=False)
    return synthetic.Made(text, reply.stop_reason, max(1, reply.output_tokens)), reply.input_tokens


async def _exchange(gw: Gateway, route: Route, request: Ask, outcome: Outcome) -> bytes:
    """One send through the background backend's queue; its slot is held until the backend lets go."""
    backend = gw.backends[route.backends[0]]
    enqueued = time.monotonic()
    try:
        lease = await backend.queue.acquire(route.priority)
    except asyncio.CancelledError:
        gw.metrics.disconnects.labels("queued").inc()
        raise
    outcome.reset(granted=time.monotonic())
    gw.metrics.queue_wait.labels(backend.name, "background").observe(outcome.granted - enqueued)
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **backend_auth(backend.config)}
    # Late or cancelled while the backend works on it, the slot stays taken until it lets go.
    with in_slot(gw, backend, lease) as call:
        call.sent = True
        async with gw.upstream.post(backend.config, request.path, request.data, headers) as resp:
            call.answered = True
            raw = await read_whole(resp, MAX_ANSWER_BYTES, backend.config)
            call.complete = True
            if resp.status != 200:
                raise _Refused(resp.status, raw)
            return raw


class _Refused(GatewayError):
    """The backend answered with an error status: nothing to send on, the synthetic answer goes instead."""

    def __init__(self, status: int, raw: bytes) -> None:
        super().__init__(f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")

