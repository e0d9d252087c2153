"""`choose_route`: which way a request goes, as a pure function of its body and the config.

What a request is decides, not its model's name. Claude Code's housekeeping
(titles, topic checks, warm-ups, count probes) has shapes the checks here
recognise whatever name it carries, and answers the gateway knows: those never
occupy the main model's slot. Everything else is work a user asked for, and a
model answers it, even on a Haiku-like name: Claude Code's agents (`Explore`,
any `model: "haiku"` agent) and WebFetch summaries run there, and an `OK` from
the gateway would be their whole report.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..config import Config
from ..conversation import fold_system_messages, strip_billing_header
from ..jsonvalues import utf8_json
from ..slots import Priority
from ..splice import splice


class RouteKind(str, Enum):
    MAIN = "main"
    BACKGROUND = "background"
    SYNTHETIC = "synthetic"
    COUNT_TOKENS = "count_tokens"


class Shape(str, Enum):
    TITLE = "title"
    TOPIC = "topic"
    WARMUP = "warmup"
    COUNT_PROBE = "count_probe"
    OTHER = "other"


class Reason(str, Enum):
    """Why a request went where it went (a metric label: a closed set)."""

    TITLE = "title"
    TOPIC = "topic"
    WARMUP = "warmup"
    COUNT_PROBE = "count_probe"
    WORK = "work"                          # main work on a main model name
    BACKGROUND_NAME_WORK = "background_name_work"  # work carried under a background (Haiku) name


REASONS = tuple(r.value for r in Reason)
# The shapes the gateway (or the background model) answers: housekeeping whose answer it knows.
HOUSEKEEPING = (Shape.TITLE, Shape.TOPIC, Shape.WARMUP)


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    shape: Shape
    backends: tuple[str, ...] = ()
    priority: Priority = Priority.MAIN
    reason: Reason = Reason.WORK


def text_of(content: Any) -> str:
    """The text of a message's or system prompt's content, string or blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content
                         if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    name = name.lower()
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


# Claude Code's housekeeping, as its own releases send it (tests/fixtures/captures: 2.0.77, 2.1.197,
# 2.1.332). A request is housekeeping only in that whole shape: a near miss from any other client (a
# schema with a `title` and more, a one-token classification, "Warmup" beside an image) is work.
IDENTITIES = ("You are Claude Code, Anthropic's official CLI for Claude.",
              "You are a Claude agent, built on Anthropic's Claude Agent SDK.")  # (print mode, 2.1.197)
TITLE_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
                "additionalProperties": False}
TITLE_PROMPTS = ("Generate a concise, sentence-case title", "You are naming a coding session")
TOPIC_PROMPT = "Analyze if this message indicates a new conversation topic."
# metadata.user_id: 2.0.77's "user_HEX_account_..._session_UUID", 2.1's JSON of device and session.
_USER_ID = re.compile(r'user_[0-9a-f]{64}_account_[^"]*_session_[0-9a-f-]{36}|\{"device_id":"[0-9a-f]{64}".*"session_id":"[0-9a-f-]{36}"\}')


def _system_blocks(body: dict[str, Any]) -> list[str]:
    system = body.get("system")
    if isinstance(system, str):
        return [system]
    if isinstance(system, list):
        return [b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


def _only_text(content: Any) -> str | None:
    """A message's content when it is text alone (a string, or one text block); None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict) \
            and content[0].get("type") == "text" and isinstance(content[0].get("text"), str):
        return content[0]["text"]
    return None


def _roles(messages: list[Any]) -> list[Any]:
    return [m.get("role") if isinstance(m, dict) else None for m in messages]


def classify_shape(body: dict[str, Any]) -> Shape:
    """Which of Claude Code's housekeeping requests this is (Shape.OTHER: work)."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    system = _system_blocks(body)
    claude_code = any(text.strip() in IDENTITIES for text in system)
    no_tools = not body.get("tools")
    if claude_code and no_tools and _roles(messages) == ["user"] and _is_title(body, system, messages[0]):
        return Shape.TITLE
    if claude_code and no_tools and _roles(messages) == ["user", "assistant"] \
            and _only_text(messages[1].get("content")) == "{" and any(t.startswith(TOPIC_PROMPT) for t in system) \
            and not body.get("output_config"):
        return Shape.TOPIC
    if claude_code and _roles(messages) == ["user"] and _only_text(messages[0].get("content")) == "Warmup" \
            and not body.get("output_config"):
        return Shape.WARMUP
    if _is_count_probe(body, messages):
        return Shape.COUNT_PROBE
    return Shape.OTHER


def _is_title(body: dict[str, Any], system: list[str], message: dict[str, Any]) -> bool:
    """2.1's session title: its own schema exactly (an answer made here satisfies it), its prompt."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    text = _only_text(message.get("content"))
    return (fmt == {"type": "json_schema", "schema": TITLE_SCHEMA} and text is not None
            and text.startswith("<session>") and "</session>" in text
            and any(t.startswith(TITLE_PROMPTS) for t in system))


def _is_count_probe(body: dict[str, Any], messages: list[Any]) -> bool:
    """The one-token generation Claude Code counts tokens with when count_tokens is missing: not
    streamed, no system prompt nor schema, its own metadata; the messages are what it counts (one
    section's text, or a whole conversation), and it may carry its extra body params."""
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    return (body.get("max_tokens") == 1 and not body.get("stream") and "system" not in body
            and "output_config" not in body and bool(messages)
            and isinstance(user_id, str) and _USER_ID.fullmatch(user_id) is not None)


def backends_for_model(model: str, config: Config) -> tuple[str, ...]:
    """The main backends whose patterns match; a name that matches none goes to the default primary."""
    group = tuple(b.name for b in config.main_backends if _matches(model, b.models))
    return group or (config.main_backends[0].name,)


def choose_route(body: dict[str, Any], config: Config, *, background_up: bool) -> Route:
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    shape = classify_shape(body)
    if shape is Shape.COUNT_PROBE and config.routing.count_probes == "count_tokens":
        return Route(RouteKind.SYNTHETIC, shape, reason=Reason.COUNT_PROBE)
    bg = config.background_backend
    if shape in HOUSEKEEPING:
        reason = Reason(shape.value)
        if bg is not None and background_up:
            return Route(RouteKind.BACKGROUND, shape, (bg.name,), Priority.BACKGROUND, reason)
        return Route(RouteKind.SYNTHETIC, shape, reason=reason)
    # Work. An agent's turn is main work whatever its name: the conversation that launched it is
    # often waiting for it, so it goes at main priority (housekeeping stays below it).
    reason = Reason.COUNT_PROBE if shape is Shape.COUNT_PROBE else (
        Reason.BACKGROUND_NAME_WORK if _matches(model, config.routing.background_models) else Reason.WORK)
    if reason is Reason.BACKGROUND_NAME_WORK and config.routing.background_work and bg is not None \
            and bg.work_capable and background_up:
        return Route(RouteKind.BACKGROUND, shape, (bg.name,), Priority.MAIN, reason)
    return Route(RouteKind.MAIN, shape, backends_for_model(model, config), Priority.MAIN, reason)


@dataclass(frozen=True)
class Rewrites:
    """What the backend a request goes to needs changed in it (forwarded_body), each for a reason the
    docs give: the billing line that defeats the prompt cache, system messages a chat template
    refuses, a max_tokens the engine refuses or a small model never stops at, a model name the engine
    does not answer to."""

    strip_billing: bool = False
    fold_system: bool = False
    max_tokens: int = 0            # clamp max_tokens to this; 0: no clamp
    model: str | None = None       # the name the engine answers to; None: the client's own


def forwarded_body(body: dict[str, Any], raw: bytes, rewrites: Rewrites) -> bytes:
    """The bytes to send a backend: the client's own, unless a documented rewrite applies; then the
    client's own with the rewritten member spliced, or, when the splice cannot be proven safe (or the
    messages were rewritten: system messages folded), `out` anew."""
    out = body
    if rewrites.strip_billing:
        out = strip_billing_header(out) or out
    if rewrites.fold_system:
        out = fold_system_messages(out) or out
    mt = out.get("max_tokens")
    if rewrites.max_tokens and isinstance(mt, int) and mt > rewrites.max_tokens:
        out = {**out, "max_tokens": rewrites.max_tokens}
    if rewrites.model and out.get("model") != rewrites.model:
        out = {**out, "model": rewrites.model}
    if out is body:
        return raw
    spliced = splice(body, out, raw)
    return spliced if spliced is not None else utf8_json(out)
