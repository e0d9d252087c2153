"""Request bodies: read whole however they arrive, parsed off the event loop when large,
and every field the gateway reads checked for its type before anything relies on it.

Claude Code's body grows with the conversation (1 MB and more in a long
session) and reaches us in many TCP writes; one `read(n)` returns only what has
arrived so far, so the body is read to its end, bounded in bytes and in time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..errors import (
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
)
from ..jsonvalues import INLINE_BYTES, is_int, reject_constant
from . import schema_limits

# Bounds on a JSON schema the gateway itself reads (a title request's output format).
MAX_SCHEMA_DEPTH = 32
# Content blocks in one request, all messages together. A long Claude Code
# session has thousands; a million tiny ones is an attack on the event loop
# (checking and re-serialising them holds the interpreter for a second).
MAX_BLOCKS = 100_000


async def read_body(request: web.Request, *, limit: int, timeout: float) -> bytes:
    """The whole request body, or 413 past `limit` bytes, or 408 when it takes longer than `timeout`."""
    ctype = request.headers.get("Content-Type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime and mime != "application/json" and not mime.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {mime!r}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Claude Code never compresses a request; a compressed one could inflate
        # to gigabytes (the server does not decompress: app.HANDLER_KWARGS).
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed")
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body is {request.content_length} bytes; the limit is {limit} "
                              f"(gateway.max_body_bytes)")
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                buf += chunk
                if len(buf) > limit:
                    raise RequestTooLarge(f"request body is over the limit of {limit} bytes (gateway.max_body_bytes)")
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g}s (gateway.body_timeout_seconds); "
                             f"{len(buf)} bytes arrived") from None
    except (HttpProcessingError, RequestPayloadError) as e:
        raise InvalidRequest(f"request body is incomplete or malformed: {getattr(e, 'message', e)}") from None
    return bytes(buf)


def _parse(raw: bytes) -> Any:
    # orjson parses a Claude Code body 3x faster, and the parse holds the interpreter (so the event
    # loop) even in a thread: 30 ms at 8 MB with json, 9 ms with orjson. What it refuses (lone
    # surrogate escapes, NaN, 1e400, deep nesting...) goes to the standard parser, which decides as
    # before and says why. One difference: an integer past 64 bits becomes a float, as it is in the
    # JavaScript that wrote the body (the bytes forwarded are the client's own either way).
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        # UTF-8 only (json.loads would take UTF-16 and UTF-32 too, which no backend reads).
        return json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None


def _parse_object(raw: bytes) -> dict[str, Any]:
    body = _parse(raw)
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _parse_and_check(raw: bytes, needs_max_tokens: bool) -> dict[str, Any]:
    body = _parse_object(raw)
    check_request(body, needs_max_tokens=needs_max_tokens)
    return body


async def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; a large one is parsed in a thread so no other client waits on it."""
    return _parse_object(raw) if len(raw) <= INLINE_BYTES else await asyncio.to_thread(_parse_object, raw)


async def parse_request(raw: bytes, *, needs_max_tokens: bool) -> dict[str, Any]:
    """A Messages API body, parsed and checked (`check_request`); a large one in a thread."""
    if len(raw) <= INLINE_BYTES:
        return _parse_and_check(raw, needs_max_tokens)
    return await asyncio.to_thread(_parse_and_check, raw, needs_max_tokens)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _expect(value: Any, kinds: tuple[type, ...], path: str, what: str) -> None:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidRequest(f"{path}: must be {what}, got {_kind(value)}")


def _check_blocks(content: Any, path: str) -> None:
    _expect(content, (str, list), path, "a string or an array of content blocks")
    if isinstance(content, list):
        for j, block in enumerate(content):
            _expect(block, (dict,), f"{path}.{j}", "a content block object")
            _expect(block.get("type"), (str,), f"{path}.{j}.type", "a string")
            if block["type"] == "text":
                _expect(block.get("text"), (str,), f"{path}.{j}.text", "a string")


def check_schema(schema: Any, path: str, depth: int = 0) -> None:
    """A JSON schema the gateway itself answers: objects all the way down, bounded in depth."""
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"{path}: nested deeper than {MAX_SCHEMA_DEPTH} levels")
    _expect(schema, (dict,), path, "a JSON schema object")
    if "type" in schema and not isinstance(schema["type"], str):
        _expect(schema["type"], (list,), f"{path}.type", "a string or an array of strings")
        for t in schema["type"]:
            _expect(t, (str,), f"{path}.type", "a string or an array of strings")
    if "properties" in schema:
        _expect(schema["properties"], (dict,), f"{path}.properties", "an object")
        for name, sub in schema["properties"].items():
            check_schema(sub, f"{path}.properties.{name}", depth + 1)
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items", depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            _expect(schema[key], (list,), f"{path}.{key}", "an array of schemas")
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{path}.{key}.{i}", depth + 1)
    if "required" in schema:
        _expect(schema["required"], (list,), f"{path}.required", "an array of strings")
        for r in schema["required"]:
            _expect(r, (str,), f"{path}.required", "an array of strings")
    if "enum" in schema:
        _expect(schema["enum"], (list,), f"{path}.enum", "an array")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema:
            _expect(schema[key], (int,), f"{path}.{key}", "a non-negative integer")
            if schema[key] < 0:
                raise InvalidRequest(f"{path}.{key}: must be a non-negative integer, got {schema[key]}")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema:
            _expect(schema[key], (int, float), f"{path}.{key}", "a number")
    if depth == 0:
        schema_limits.check(schema, path)


def check_request(body: dict[str, Any], *, needs_max_tokens: bool) -> None:
    """Every field the gateway reads has the type it needs; the first that does not is named in a 400."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required (a non-empty string)")
    if not model.isprintable() or len(model) > 256:  # lone surrogates are not printable
        raise InvalidRequest("model: must be a printable Unicode name of at most 256 characters")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required (a list of messages)")
    blocks = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages.{i}: each message must be an object with a role")
        # Roles are the backend's business: Claude Code 2.1.332 sends "system" messages too.
        if "content" not in m:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        _check_blocks(m["content"], f"messages.{i}.content")
        blocks += len(m["content"]) if isinstance(m["content"], list) else 1
        if blocks > MAX_BLOCKS:
            raise InvalidRequest(f"messages.{i}: more than {MAX_BLOCKS} content blocks in one request")
    if needs_max_tokens:
        mt = body.get("max_tokens")
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            shown = mt if is_int(mt) else _kind(mt)
            raise InvalidRequest(f"max_tokens: must be a positive integer, got {shown}")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream: must be true or false")
    if body.get("system") is not None:
        _check_blocks(body["system"], "system")
    for key in ("tools",):
        if body.get(key) is not None:
            _expect(body[key], (list,), key, "an array")
            for i, tool in enumerate(body[key]):
                _expect(tool, (dict,), f"{key}.{i}", "an object")
    for key in ("tool_choice", "metadata", "thinking"):
        if body.get(key) is not None:
            _expect(body[key], (dict,), key, "an object")
    oc = body.get("output_config")
    if oc is not None:
        _expect(oc, (dict,), "output_config", "an object")
        fmt = oc.get("format")
        if fmt is not None:
            _expect(fmt, (dict,), "output_config.format", "an object")
            _expect(fmt.get("type"), (str,), "output_config.format.type", "a string")
            if fmt["type"] == "json_schema":
                check_schema(fmt.get("schema"), "output_config.format.schema")
