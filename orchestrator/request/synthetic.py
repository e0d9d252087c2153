"""Answers the gateway makes itself, for background requests with no model to run them.

Each answer must be correct for what was asked, or Claude Code shows an error:
a title request gets JSON valid against its schema, a topic request continues
its `{` prefill into valid JSON, and streams are complete SSE sequences.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, NamedTuple

from aiohttp import web

from .. import sse
from ..errors import InvalidRequest
from .routing import Shape, text_of
from .schemas import local_ref

# Request verbs and filler that say what is to be done, not what it is about.
_FILLER = {
    "a", "an", "the", "please", "can", "could", "would", "you", "i", "we", "me", "us", "my", "our",
    "write", "fix", "add", "make", "create", "implement", "help", "with", "check", "investigate",
    "debug", "refactor", "update", "look", "into", "evaluate", "build", "to", "for", "of", "and",
    "some", "want", "need", "let's", "lets", "how", "do", "is", "are", "what", "why",
}
_TRAILING = {"a", "an", "the", "that", "to", "for", "of", "and", "in", "on", "with", "which"}
_WORD = re.compile(r"[\w][\w.'/-]*", re.U)


# The user's words are read from the start of the message only: a title needs
# five words, and a search over megabytes would hold the event loop.
MAX_WORDS_SCAN = 16 * 1024
MAX_WORD_CHARS = 40


def _session_text(text: str) -> str | None:
    """What stands inside Claude Code's <session> tags, found in linear time."""
    start = text.find("<session>")
    if start < 0:
        return None
    end = text.find("</session>", start + 9)
    return text[start + 9:end] if end >= 0 else None


def user_words(body: dict[str, Any]) -> str:
    """The user's own text: inside Claude Code's <session> tags when present, else the last user message."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            text = text_of(msg.get("content"))[:MAX_WORDS_SCAN]
            inside = _session_text(text)
            return (inside if inside is not None else text).strip()
    return ""


def make_title(body: dict[str, Any], max_words: int = 5) -> str:
    words = [w[:MAX_WORD_CHARS] for w in _WORD.findall(user_words(body))]
    while words and words[0].lower() in _FILLER:
        words.pop(0)
    words = words[:max_words]
    while words and words[-1].lower() in _TRAILING:
        words.pop()
    if not words:
        return "New session"
    title = " ".join(words)
    return title[0].upper() + title[1:]


# What a synthetic answer may take: a schema that asks for more is refused with a
# 400 naming the key, rather than answered with megabytes or a blocked event loop.
MAX_ANSWER_BYTES = 64 * 1024


class _Budget:
    """Characters left for the answer; every value costs at least one."""

    def __init__(self, chars: int) -> None:
        self.left = chars

    def spend(self, n: int, path: str) -> None:
        self.left -= max(1, n)
        if self.left < 0:
            raise InvalidRequest(f"{path}: the smallest answer valid against output_config.format.schema is "
                                 f"larger than the gateway answers ({MAX_ANSWER_BYTES} bytes); route this "
                                 f"request to a model")


def instance_of(schema: Any, title: str, path: str = "output_config.format.schema",
                budget: _Budget | None = None, root: Any = None, followed: frozenset[str] = frozenset()) -> Any:
    """A small value valid against a JSON schema, with `title` wherever a title string fits.
    The schema has passed `bodies.check_schema` (objects, bounded depth); the answer's size is bounded here.
    A local `$ref` is followed in `root` (a ref back to itself, `followed` already, constrains nothing)."""
    budget = budget or _Budget(MAX_ANSWER_BYTES)
    root = schema if root is None else root
    budget.spend(1, path)
    if not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref not in followed and (target := local_ref(root, ref)) is not None:
        return instance_of(target, title, f"{path}.$ref", budget, root, followed | {ref})
    if "const" in schema:
        budget.spend(len(json.dumps(schema["const"])), f"{path}.const")
        return schema["const"]
    if schema.get("enum"):
        budget.spend(len(json.dumps(schema["enum"][0])), f"{path}.enum")
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance_of(schema[key][0], title, f"{path}.{key}.0", budget, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        keys = list(props) if schema.get("additionalProperties") is False else list(schema.get("required") or props)
        out = {}
        for k in keys:
            sub = props.get(k, {})
            budget.spend(len(k), f"{path}.properties.{k}")
            if k == "title" and isinstance(sub, dict) and sub.get("type", "string") == "string":
                budget.spend(len(title), f"{path}.properties.{k}")
                out[k] = title
            else:
                out[k] = instance_of(sub, title, f"{path}.properties.{k}", budget, root)
        return out
    if kind == "string":
        need = schema.get("minLength", 1)
        use_title = title and need <= len(title)
        budget.spend(len(title) if use_title else need, f"{path}.minLength")
        return title if use_title else "x" * need
    if kind == "boolean":
        return False
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "array":
        n = schema.get("minItems", 0)
        budget.spend(n, f"{path}.minItems")
        return [instance_of(schema.get("items", {}), title, f"{path}.items", budget, root) for _ in range(n)]
    return None


def answer_text(body: dict[str, Any], shape: Shape) -> tuple[str, str]:
    """(text, stop_reason) of the synthetic answer for this request."""
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return json.dumps(instance_of(fmt.get("schema"), make_title(body))), "end_turn"
    if shape is Shape.TOPIC:
        # The client glues its "{" prefill in front of what we return.
        full = json.dumps({"isNewTopic": True, "title": make_title(body, max_words=3)})
        return full[1:], "end_turn"
    if shape is Shape.COUNT_PROBE:
        return "", "max_tokens"
    if shape is Shape.WARMUP:
        return "Ready.", "end_turn"
    return "OK", "end_turn"


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _output_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


class Made(NamedTuple):
    """An answer a background model made, sent in the same message shape as the gateway's own."""

    text: str
    stop_reason: str
    output_tokens: int


def message(body: dict[str, Any], shape: Shape, input_tokens: int, made: Made | None = None) -> dict[str, Any]:
    text, stop = (made.text, made.stop_reason) if made else answer_text(body, shape)
    return {
        "id": f"msg_synth_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(input_tokens, made.output_tokens if made else _output_tokens(text)),
    }


def stream(body: dict[str, Any], shape: Shape, input_tokens: int, made: Made | None = None) -> bytes:
    """The whole SSE sequence the real API would send for the same answer."""
    msg = message(body, shape, input_tokens, made)
    text = msg["content"][0]["text"]
    start = {**msg, "content": [], "stop_reason": None, "usage": _usage(input_tokens, 1)}
    parts = [
        sse.encode("message_start", {"type": "message_start", "message": start}),
        sse.encode("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
    ]
    if text:
        parts.append(sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": text}}))
    parts += [
        sse.encode("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse.encode("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": msg["usage"]["output_tokens"]}}),
        sse.encode("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(parts)


def response(body: dict[str, Any], shape: Shape, input_tokens: int, made: Made | None = None) -> web.Response:
    """The answer as the client asked for it: an SSE stream or a JSON message."""
    if body.get("stream"):
        return web.Response(body=stream(body, shape, input_tokens, made), content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
    return web.json_response(message(body, shape, input_tokens, made))
