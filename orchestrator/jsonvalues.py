"""Two JSON rules every reader in the gateway applies the same way."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def reject_constant(name: str) -> Any:
    """`parse_constant` for json.loads: NaN and Infinity are Python's, not JSON, and a client's
    JSON.parse would throw on them."""
    raise ValueError(f"{name} is not valid JSON")
