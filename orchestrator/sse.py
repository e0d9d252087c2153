"""Server-Sent Events: encode our own events, and split a backend's stream into whole events.

Reading is tolerant: any framing the SSE specification allows (LF, CRLF or CR
line endings, events split at any byte, comments) is understood. Writing is
faithful: the relay forwards each block's own bytes, so the client gets exactly
what the backend sent, only cut at event boundaries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

# The largest single event the relay accepts from a backend. An answer's text
# comes in many small deltas; one event of this size is a broken backend.
MAX_EVENT_BYTES = 16 * 1024 * 1024

_EOL = re.compile(rb"\r\n|\r|\n")


def encode(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class Event:
    event: str
    data: str

    def json(self) -> Any:
        # Every relayed event is read (usage, the model name, errors): orjson first, for speed; what
        # it refuses goes to the standard parser, which decides as before.
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            pass
        try:
            return json.loads(self.data)
        except (ValueError, RecursionError):
            return None


@dataclass
class Block:
    """The bytes of one stream block up to and including its blank line, and the event
    it dispatches (None for a block of comments only, such as llama-server's `:` pings)."""

    raw: bytes
    event: Event | None


class EventTooLarge(ValueError):
    pass


class SSEParser:
    """Incremental: feed arbitrary byte chunks, get complete blocks back."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._block_start = 0   # where the block being read starts in _buf
        self._scan = 0          # where the next line starts
        self._searched = 0      # no line ending before here: a long line is scanned once, not per chunk
        self._started = False   # a byte-order mark may open the stream (and is not part of a field name)
        self._event = ""
        self._data: list[str] = []

    @property
    def pending(self) -> int:
        """Bytes of an unfinished block held back."""
        return len(self._buf) - self._block_start

    def feed(self, chunk: bytes, *, eof: bool = False) -> list[Block]:
        """Blocks completed by `chunk`; with `eof`, the stream ended after it (a trailing CR ends a line)."""
        self._buf += chunk
        if not self._started and len(self._buf) >= 3:
            self._started = True
            if self._buf.startswith(b"\xef\xbb\xbf"):
                self._scan = self._searched = 3  # kept in the block's bytes, skipped by the parser
        blocks: list[Block] = []
        while True:
            m = _EOL.search(self._buf, max(self._scan, self._searched))
            # A CR at the very end may be the first half of a CRLF: wait for the next byte.
            if m is None or (m.group() == b"\r" and m.end() == len(self._buf) and not eof):
                self._searched = m.start() if m is not None else len(self._buf)
                break
            line = bytes(self._buf[self._scan:m.start()])
            self._scan = m.end()
            if line:
                self._field(line)
                continue
            raw = bytes(self._buf[self._block_start:self._scan])
            blocks.append(Block(raw, self._dispatch()))
            self._block_start = self._scan
        if self._block_start:
            del self._buf[:self._block_start]
            self._scan -= self._block_start
            self._searched = max(0, self._searched - self._block_start)
            self._block_start = 0
        if len(self._buf) > self.max_event_bytes:
            raise EventTooLarge(f"an SSE event over {self.max_event_bytes} bytes")
        return blocks

    def _field(self, line: bytes) -> None:
        if line.startswith(b":"):
            return
        name, _, value = line.decode("utf-8", "replace").partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)

    def _dispatch(self) -> Event | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        if not data:
            return None
        return Event(event or "message", "\n".join(data))


def events(raw: bytes) -> list[Event]:
    """The events of a whole stream."""
    return [b.event for b in SSEParser(max_event_bytes=len(raw) + 1).feed(raw, eof=True) if b.event is not None]
