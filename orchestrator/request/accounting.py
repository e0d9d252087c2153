"""What a finished request cost and how it went: its `Outcome`, read from the answer's usage, then
`record`ed once in the metrics and in one log line, whichever path answered it."""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..backends.gateway import Gateway
from ..jsonvalues import is_int

log = logging.getLogger(__name__)


class Ended(enum.StrEnum):
    """How a request ended when no HTTP status of its own says it."""

    CLIENT_GONE = "client_gone"    # the client left before its answer ended
    STREAM_ERROR = "stream_error"  # its stream had begun: the error went as an SSE event


@dataclass
class Outcome:
    """What the answer said of itself, for metrics and for the request's log line."""

    backend: str
    # The HTTP status the client got (200: answered), or how it ended without one.
    status: int | Ended = 200
    first_content: float | None = None
    granted: float | None = None
    input_tokens: int = 0
    cache_read_tokens: int = 0
    # Computed and written to the cache (vLLM reports them; llama-server counts them in input_tokens).
    cache_write_tokens: int = 0
    output_tokens: int = 0
    # Why its prompt missed the cache (cachemiss.py), once its answer ended whole.
    cache_reason: str | None = None
    # "tool_use": the client runs a tool and sends the conversation's next turn at once.
    stop_reason: str | None = None

    def reset(self, granted: float) -> None:
        """A new send: forget what a failed one saw."""
        self.granted, self.first_content = granted, None
        self.input_tokens = self.cache_read_tokens = self.cache_write_tokens = self.output_tokens = 0
        self.stop_reason = None

    @property
    def label(self) -> str:
        """Its status as the `requests` metric's label and the log line give it: "200", "529",
        "client_gone", "stream_error"."""
        return str(self.status)

    @property
    def prompt_tokens(self) -> int:
        """The whole prompt: Anthropic's input_tokens excludes the tokens read from and written to cache."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def take_usage(self, usage: Any) -> None:
        """An Anthropic `usage` object's counts, where it has them."""
        if not isinstance(usage, dict):
            return
        for key, attr in (("input_tokens", "input_tokens"), ("cache_read_input_tokens", "cache_read_tokens"),
                          ("cache_creation_input_tokens", "cache_write_tokens"), ("output_tokens", "output_tokens")):
            if is_int(usage.get(key)):
                setattr(self, attr, usage[key])

    def observe_event(self, kind: str, data: dict[str, Any]) -> None:
        """One SSE event of the answer: its first content, and the usage it carries."""
        if kind in ("content_block_start", "content_block_delta") and self.first_content is None:
            self.first_content = time.monotonic()
        elif kind == "message_start":
            msg = data.get("message")
            self.take_usage(msg.get("usage") if isinstance(msg, dict) else None)
        elif kind == "message_delta":
            self.take_usage(data.get("usage"))
            self._take_stop(data.get("delta"))

    def observe_message(self, raw: bytes) -> Any:
        """A whole (non-streaming) answer: its JSON, or None, with its usage taken."""
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if isinstance(message, dict):
            self.take_usage(message.get("usage"))
            self._take_stop(message)
        return message

    def _take_stop(self, holder: Any) -> None:
        if isinstance(holder, dict) and isinstance(holder.get("stop_reason"), str):
            self.stop_reason = holder["stop_reason"][:32]


def record(gw: Gateway, route: str, outcome: Outcome, arrived: float, *, count_tokens: bool = True) -> None:
    """Account one finished request that went to a backend, and log it (its tokens too, unless
    the caller counted them)."""
    m, b = gw.metrics, outcome.backend
    end = time.monotonic()
    ttft = f"{outcome.first_content - arrived:.2f}s" if outcome.first_content is not None else "-"
    log.info("%s %s %s in %.2fs (ttft %s; prompt %d + %d cached, output %d)", route, b, outcome.label,
             end - arrived, ttft, outcome.input_tokens, outcome.cache_read_tokens, outcome.output_tokens)
    m.requests.labels(route, b, outcome.label).inc()
    m.duration.labels(b, route).observe(end - arrived)
    if outcome.first_content is not None:
        m.ttft.labels(b, route).observe(outcome.first_content - arrived)
        if outcome.granted is not None:
            m.upstream_ttft.labels(b).observe(outcome.first_content - outcome.granted)
        gen_time = end - outcome.first_content
        if outcome.output_tokens > 1 and gen_time > 0:
            m.tokens_per_second.labels(b).observe(outcome.output_tokens / gen_time)
    if not count_tokens:
        return
    # Anthropic's usage: input_tokens excludes the tokens read from cache and those written to it.
    m.prompt_tokens.labels(b, "hit").inc(outcome.cache_read_tokens)
    m.prompt_tokens.labels(b, "miss").inc(outcome.input_tokens + outcome.cache_write_tokens)
    m.output_tokens.labels(b).inc(outcome.output_tokens)


def record_synthetic(gw: Gateway, shape: str, streamed: bool, arrived: float) -> None:
    """Account an answer the gateway made itself."""
    m = gw.metrics
    m.synthetic.labels(shape).inc()
    m.requests.labels("synthetic", "gateway", "200").inc()
    if streamed:
        m.ttft.labels("gateway", "synthetic").observe(time.monotonic() - arrived)
    m.duration.labels("gateway", "synthetic").observe(time.monotonic() - arrived)
