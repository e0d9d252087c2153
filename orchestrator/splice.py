"""Splicing a rewrite into the client's bytes: the documented rewrites (the billing line dropped,
`max_tokens` clamped, system messages folded, the engine's model name) applied to the body as the client wrote it, every other
byte kept, where that can be proven right; else the caller re-serialises. Used for what is forwarded
(request/routing.py's forwarded_body) and what is counted (backends/counting.py)."""

from __future__ import annotations

import json
import re
from typing import Any

from .jsonvalues import reject_constant, utf8_json

# ---- splicing a rewrite into the client's bytes -------------------------------------------------
# Re-serialising a whole body to drop one system block costs as much as parsing it (60 ms for 8 MB,
# holding the interpreter, so the event loop, most of that time), and a long conversation grows every
# turn. The members rewritten (`system`, `max_tokens`) come after the conversation in Claude Code's
# bodies, so they are found from the end, and proven top-level by reading only what follows them.

# Past this many bytes from the member to the end (or half the body, if more), proving costs about
# what re-serialising does: re-serialise.
SPLICE_TAIL_BYTES = 256 * 1024
# Occurrences of the key nested deeper (a tool schema's property named "system") tried, last first.
SPLICE_CANDIDATES = 16
_WS = re.compile(r"[ \t\n\r]*")


_DECODER = json.JSONDecoder(parse_constant=reject_constant)


def _value_end(text: str, i: int) -> int:
    """The end of the JSON value at `i` (ValueError if none)."""
    return _DECODER.raw_decode(text, i)[1]


def _escaped(raw: bytes, at: int) -> bool:
    """Whether the quote at `at` is escaped (an odd run of backslashes before it)."""
    n = 0
    while at - n > 0 and raw[at - n - 1] == 0x5C:
        n += 1
    return n % 2 == 1


def _effective_member(text: str, key: str, i: int) -> tuple[int, int] | None:
    """(start, end) of the value at `i` in `text` (`text` starts at the member's opening quote) if the
    member is the top-level one that json.loads keeps, else None.

    Proof: the quote that opens `text` is unescaped (checked by the caller), so it opens a string (a
    closing one would be followed by `key`, not JSON) and we are outside any string. Then if what
    follows the value is `,"k":v` pairs with no other `key` and a `}` with only whitespace after it,
    that `}` is the document's last, which closes the top-level object: the member is at depth 1,
    and the last of its name."""
    vs = _WS.match(text, i).end()
    ve = j = _value_end(text, vs)
    while True:
        j = _WS.match(text, j).end()
        c = text[j:j + 1]
        if c == "}":
            return (vs, ve) if not text[j + 1:].strip(" \t\n\r") else None
        if c != ",":
            return None
        j = _WS.match(text, j + 1).end()
        name, j = _DECODER.raw_decode(text, j)
        if not isinstance(name, str) or name == key:
            return None
        j = _WS.match(text, j).end()
        if text[j:j + 1] != ":":
            return None
        j = _value_end(text, _WS.match(text, j + 1).end())


def _find_member(raw: bytes, key: str) -> tuple[int, str, int, int] | None:
    """(offset, text, value start, value end) of the top-level `key` json.loads keeps, written
    `"key":` in `raw`; `text` is raw[offset:] decoded as Latin-1, so its offsets are byte offsets
    (a UTF-8 sequence has no byte below 0x80: no JSON structure is misread). None if not proven."""
    needle = json.dumps(key).encode() + b":"
    end = len(raw)
    for _ in range(SPLICE_CANDIDATES):
        at = raw.rfind(needle, 0, end)
        if at < 0 or len(raw) - at > max(SPLICE_TAIL_BYTES, len(raw) // 2):
            return None
        end = at
        if _escaped(raw, at):
            continue  # the end of a longer key: `"...\"system":`
        text = raw[at:].decode("latin-1")
        try:
            span = _effective_member(text, key, len(needle))
        except (ValueError, RecursionError):
            span = None
        if span is not None:
            return at, text, *span
    return None


# The folded system messages (conversation.fold_system_messages) sit at the front of `messages`
# (Claude Code's is its second message): found within this many bytes from the body's start, else
# the body is re-serialised.
SPLICE_HEAD_BYTES = 1024 * 1024


def _head_value(text: str, key: str) -> int:
    """Where the value of the first top-level member `key` starts in `text` (a body's head), walked
    from its start, each earlier member skipped by its value's end. ValueError or IndexError if not
    there."""
    i = _WS.match(text, 0).end()
    if text[i] != "{":
        raise ValueError("not an object")
    i += 1
    while True:
        name, i = _DECODER.raw_decode(text, _WS.match(text, i).end())
        i = _WS.match(text, i).end()
        if text[i] != ":":
            raise ValueError("no colon")
        i = _WS.match(text, i + 1).end()
        if name == key:
            return i
        i = _WS.match(text, _value_end(text, i)).end()
        if text[i] != ",":
            raise ValueError("not found")
        i += 1


# A letter of "model" written as an escape: a key that json.loads reads as "model" without the bytes.
_MODEL_ESCAPE = re.compile(rb"\\u00(?:6[dDfF45cC])")


def _model_edit(body: dict[str, Any], new: Any, raw: bytes) -> tuple[int, int, bytes] | None:
    """The edit that gives `model` (Claude Code's first member) the name `new`: proven when the first
    top-level `model` holds what json.loads kept, `"model"` is written nowhere else in the body but
    inside the top-level `tools` (Claude Code's Task tool has a `model` parameter), and no letter of
    it is written as an escape (so no other key reads as "model"); None otherwise."""
    if not isinstance(new, str) or _MODEL_ESCAPE.search(raw):
        return None
    written = raw.count(b'"model"')
    if written > 1:
        tools = _find_member(raw, "tools")
        if tools is not None:
            at, _, vs, ve = tools
            written -= raw.count(b'"model"', at + vs, at + ve)
    if written != 1:
        return None
    text = raw[:SPLICE_HEAD_BYTES].decode("latin-1")  # byte offsets: see _find_member
    try:
        start = _head_value(text, "model")
        end = _value_end(text, start)
        if json.loads(raw[start:end].decode("utf-8")) != body.get("model"):
            return None
    except (ValueError, IndexError, RecursionError):
        return None
    return start, end, utf8_json(new)


def _head_elements(raw: bytes, key: str, count: int) -> list[tuple[int, int]] | None:
    """Byte spans of the first `count` elements of the top-level array `key`, walked from the body's
    start within SPLICE_HEAD_BYTES; None if not found there. Which member json.loads kept is the
    caller's to check (it compares the elements)."""
    text = raw[:SPLICE_HEAD_BYTES].decode("latin-1")  # byte offsets: see _find_member
    try:
        i = _head_value(text, key)
        if text[i] != "[":
            return None
        spans = []
        for n in range(count):
            start = _WS.match(text, i + 1 if n == 0 else i).end()
            i = _value_end(text, start)
            spans.append((start, i))
            i = _WS.match(text, i).end()
            if n < count - 1:
                if text[i] != ",":
                    return None
                i += 1
        return spans
    except (ValueError, IndexError, RecursionError):
        return None


def _messages_edit(body: dict[str, Any], out: dict[str, Any], raw: bytes) -> tuple[int, int, bytes] | None:
    """The edit that turns `body`'s messages into `out`'s when they differ only up to the last system
    message (the fold's reach), the rest being the same objects; None otherwise."""
    old, new = body.get("messages"), out.get("messages")
    if not isinstance(old, list) or not isinstance(new, list):
        return None
    last = max((i for i, m in enumerate(old) if isinstance(m, dict) and m.get("role") == "system"), default=-1)
    rest = len(old) - last - 1
    if last < 0 or len(new) < rest or any(a is not b for a, b in zip(new[len(new) - rest:], old[last + 1:])):
        return None
    spans = _head_elements(raw, "messages", last + 1)
    if spans is None:
        return None
    for (start, stop), message in zip(spans, old):  # the member json.loads kept, element by element
        try:
            if json.loads(raw[start:stop].decode("utf-8")) != message:
                return None
        except (ValueError, RecursionError):
            return None
    return spans[0][0], spans[-1][1], b",".join(utf8_json(m) for m in new[:len(new) - rest])


_SPLICED = frozenset({"messages", "model", "system", "max_tokens"})


def splice(body: dict[str, Any], out: dict[str, Any], raw: bytes) -> bytes | None:
    """`raw` (the bytes `body` was parsed from) with `out`'s rewrites of `system` (its first block
    dropped, or its first line), `messages` (system messages folded, at its front), `model` (the
    engine's own name) and `max_tokens` spliced in, every other byte as the client sent it; None when
    that cannot be proven right. Any other member changed: None."""
    if out.keys() != body.keys() or any(out[k] is not body[k] for k in out if k not in _SPLICED):
        return None  # a rewrite this module does not know: never dropped silently
    edits: list[tuple[int, int, bytes]] = []
    if out.get("messages") is not body.get("messages"):
        edit = _messages_edit(body, out, raw)
        if edit is None:
            return None
        edits.append(edit)
    if out.get("model") != body.get("model"):
        edit = _model_edit(body, out.get("model"), raw)
        if edit is None:
            return None
        edits.append(edit)
    if out.get("system") is not body.get("system"):
        found = _find_member(raw, "system")
        if found is None:
            return None
        at, text, vs, ve = found
        system, new = body.get("system"), out.get("system")
        if isinstance(system, list) and isinstance(new, list) and new == system[1:] and text[vs] == "[":
            # Cut the first element, the comma after it and the whitespace before the next one.
            es = _WS.match(text, vs + 1).end()
            try:
                ee = _value_end(text, es)
                first = json.loads(raw[at + es:at + ee].decode("utf-8"))
            except (ValueError, RecursionError):
                return None
            if first != system[0]:
                return None
            k = _WS.match(text, ee).end()
            cut_end = _WS.match(text, k + 1).end() if text[k] == "," else k
            edits.append((at + es, at + cut_end, b""))
        elif isinstance(new, str):
            edits.append((at + vs, at + ve, utf8_json(new)))
        else:
            return None
    if out.get("max_tokens") != body.get("max_tokens"):
        found = _find_member(raw, "max_tokens")
        new_mt = out.get("max_tokens")
        if found is None or not isinstance(new_mt, int):
            return None
        at, text, vs, ve = found
        try:
            value = json.loads(text[vs:ve])
        except ValueError:
            return None
        if value != body.get("max_tokens") or isinstance(value, bool):
            return None
        edits.append((at + vs, at + ve, str(new_mt).encode()))
    edits.sort()
    whole = memoryview(raw)  # slices without copies: the join below is the one copy of the body
    pieces, pos = [], 0
    for start, stop, new_bytes in edits:
        if start < pos:
            return None  # overlapping edits: never in a JSON object, but not ours to guess
        pieces += [whole[pos:start], new_bytes]
        pos = stop
    pieces.append(whole[pos:])
    return b"".join(pieces)


