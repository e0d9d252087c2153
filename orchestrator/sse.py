"""Server-Sent Events: encode our own events, and watch a passed-through stream.

The parser never changes the bytes the client gets; it only reads a copy to
learn usage, time to first token, and whether the stream ended properly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def encode(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class Event:
    event: str
    data: str

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SSEParser:
    """Incremental: feed arbitrary byte chunks, get complete events back."""

    # An event larger than this is not one Anthropic or llama-server sends;
    # stop buffering rather than grow without bound.
    MAX_EVENT_BYTES = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self.overflowed:
            return []
        self._buf += chunk
        events = []
        while True:
            cut, sep_len = self._boundary()
            if cut < 0:
                break
            block, self._buf = self._buf[:cut], self._buf[cut + sep_len:]
            ev = self._parse_block(block.decode("utf-8", "replace"))
            if ev is not None:
                events.append(ev)
        if len(self._buf) > self.MAX_EVENT_BYTES:
            self.overflowed = True
            self._buf = b""
        return events

    def _boundary(self) -> tuple[int, int]:
        best = (-1, 0)
        for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            i = self._buf.find(sep)
            if i >= 0 and (best[0] < 0 or i < best[0]):
                best = (i, len(sep))
        return best

    @staticmethod
    def _parse_block(block: str) -> Event | None:
        event, data = "message", []
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if not data and event == "message":
            return None
        return Event(event, "\n".join(data))
