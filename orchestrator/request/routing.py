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


def classify_shape(body: dict[str, Any]) -> Shape:
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and not body.get("tools")
            and "title" in ((fmt.get("schema") or {}).get("properties") or {})):
        return Shape.TITLE
    if last.get("role") == "assistant" and text_of(last.get("content")).strip() == "{" \
            and "isNewTopic" in text_of(body.get("system")):
        return Shape.TOPIC
    if len(messages) == 1 and last.get("role") == "user" and text_of(last.get("content")).strip() == "Warmup":
        return Shape.WARMUP
    if body.get("max_tokens") == 1 and not body.get("stream"):
        return Shape.COUNT_PROBE
    return Shape.OTHER


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
