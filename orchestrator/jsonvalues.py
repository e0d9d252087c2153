"""The JSON rules every reader and writer in the gateway applies the same way."""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequest

# The one size past which a body's JSON work (parse, checks, re-serialisation,
# hashing) goes to a thread: below it, well under a millisecond, not worth a
# thread hop; a 30 MB conversation takes a quarter of a second, which no other
# client should wait on.
INLINE_BYTES = 64 * 1024


def is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def reject_constant(name: str) -> Any:
    """`parse_constant` for json.loads: NaN and Infinity are Python's, not JSON, and a client's
    JSON.parse would throw on them."""
    raise ValueError(f"{name} is not valid JSON")


def utf8_json(obj: Any) -> bytes:
    """Compact JSON in UTF-8. A lone surrogate ("\\ud800": valid JSON, not Unicode) has no UTF-8 form."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape), which is "
                             "not valid Unicode") from None
