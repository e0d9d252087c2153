"""`choose_route`: which way a request goes, as a pure function of its body and the config.

Background traffic (Claude Code's titles, topic checks, warm-ups, and anything
on a Haiku-like name) must never occupy the main model's slot; the shape
checks here recognise it even when it carries the main model's name.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import Config
from .errors import InvalidRequest
from .slots import Priority

BILLING_PREFIX = "x-anthropic-billing-header:"


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


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    shape: Shape
    backends: tuple[str, ...] = ()
    priority: Priority = Priority.MAIN


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
        return Route(RouteKind.SYNTHETIC, shape)
    housekeeping = shape in (Shape.TITLE, Shape.TOPIC, Shape.WARMUP)
    if housekeeping or _matches(model, config.routing.background_models):
        bg = config.background_backend
        if bg is not None and background_up:
            return Route(RouteKind.BACKGROUND, shape, (bg.name,), Priority.BACKGROUND)
        return Route(RouteKind.SYNTHETIC, shape)
    return Route(RouteKind.MAIN, shape, backends_for_model(model, config), Priority.MAIN)


def strip_billing_header(body: dict[str, Any]) -> dict[str, Any] | None:
    """The body without Claude Code's per-request billing line, or None if it has none.

    The line (`cc_version=...; cch=...`) differs on every request and comes
    first, so leaving it in makes the backend's prompt cache miss from token 0.
    """
    system = body.get("system")
    if isinstance(system, list) and system and isinstance(system[0], dict) \
            and str(system[0].get("text", "")).startswith(BILLING_PREFIX):
        return {**body, "system": system[1:]}
    if isinstance(system, str) and system.startswith(BILLING_PREFIX):
        _, _, rest = system.partition("\n")
        return {**body, "system": rest}
    return None


def forwarded_body(body: dict[str, Any], raw: bytes, *, strip_billing: bool, max_output_tokens: int) -> bytes:
    """The bytes to send a backend: the client's own, unless a documented rewrite applies."""
    out = body
    if strip_billing:
        out = strip_billing_header(out) or out
    mt = out.get("max_tokens")
    if max_output_tokens and isinstance(mt, int) and mt > max_output_tokens:
        out = {**out, "max_tokens": max_output_tokens}
    if out is body:
        return raw
    return utf8_json(out)


def utf8_json(obj: Any) -> bytes:
    """Compact JSON in UTF-8. A lone surrogate ("\\ud800": valid JSON, not Unicode) has no UTF-8 form."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape), which is "
                             "not valid Unicode") from None
