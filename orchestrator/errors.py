"""One exception family that renders as the Anthropic error envelope.

Every error a client sees, from bad JSON to a dead backend, goes through
`GatewayError.body()` so Claude Code's retry logic and error display work the
same way they do against the real API.
"""

from __future__ import annotations

import json
import re
from typing import Any


class GatewayError(Exception):
    status = 500
    error_type = "api_error"

    def __init__(self, message: str, *, status: int | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class UnsupportedMediaType(InvalidRequest):
    status = 415


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"


class Forbidden(GatewayError):
    status = 403
    error_type = "permission_error"


class RequestTimeout(GatewayError):
    """The client was too slow to send its request."""

    status = 408
    error_type = "timeout_error"


class NotFound(GatewayError):
    status = 404
    error_type = "not_found_error"


class RequestTooLarge(GatewayError):
    status = 413
    error_type = "request_too_large"


class Overloaded(GatewayError):
    """529 with retry-after: the status Claude Code treats as 'try again later'."""

    status = 529
    error_type = "overloaded_error"
    # Why a request was refused, for orchestrator_rejections_total.
    reason = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 10):
        super().__init__(message, headers={"retry-after": str(retry_after)})
        self.retry_after = retry_after


class BackendFailed(Overloaded):
    """The backend will not come back by itself (FATAL, or down past the grace)."""

    reason = "backend_failed"


class UpstreamError(GatewayError):
    """The backend failed: refused, reset, timed out, or answered nonsense."""

    status = 502
    error_type = "api_error"


class UpstreamUnavailable(UpstreamError):
    """No byte was exchanged: the request can safely be sent again."""


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"


# Anthropic's error types by HTTP status, for errors that come without one.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# The types Anthropic's API gives an error; an engine's own (vLLM's exception names, BadRequestError)
# are named in the message instead, and the type follows the status.
ANTHROPIC_TYPES = frozenset({*_TYPE_BY_STATUS.values(), "api_error", "billing_error"})


def error_for_status(status: int, message: str) -> GatewayError:
    """An error in the envelope for a bare HTTP status (aiohttp's own refusals, a backend's odd answer)."""
    error_type = _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return GatewayError(message, status=status, error_type=error_type)


def from_upstream(status: int, raw: bytes, retry_after: str | None = None) -> GatewayError:
    """Translate a backend's error answer (llama-server's is OpenAI-shaped) to ours.

    A 5xx stays a 5xx so clients retry; a 4xx keeps its status so they do not;
    the backend's Retry-After goes with it.
    """
    message = raw.decode("utf-8", "replace").strip()[:2000] or f"upstream answered HTTP {status}"
    error_type = None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        overflow = context_overflow(err)
        if overflow is not None:
            return overflow
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            if parsed.get("type") == "error" and err.get("type") in ANTHROPIC_TYPES:
                error_type = err["type"]  # already Anthropic-shaped
            elif parsed.get("type") == "error" and isinstance(err.get("type"), str) and err["type"]:
                message = f"[{err['type'][:64]}] {message}"  # an engine's own type in the envelope (vLLM)
        elif isinstance(err, str):
            message = err
    if error_type is None:
        error_type = _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if status < 400:
        status = 502
    # Seconds or an HTTP date; anything else is not a Retry-After worth passing on.
    ok = retry_after and len(retry_after) < 64 and retry_after.isascii() and retry_after.isprintable()
    headers = {"retry-after": retry_after.strip()} if ok else None
    return GatewayError(f"backend: {message}", status=status, error_type=error_type, headers=headers)


# llama-server's own numbers in its message, for a server that leaves out n_prompt_tokens and n_ctx:
# "request (9031 tokens) exceeds the available context size (8192 tokens)" (or "input (…) is larger
# than the max context size (…)" on a context that cannot split its batch).
_OVERFLOW_NUMBERS = re.compile(r"\((\d+) tokens\).*?\((\d+) tokens\)")
# vLLM's (a 400 BadRequestError, on /v1/messages and count_tokens alike; N is where it stopped counting):
# "This model's maximum context length is 8192 tokens. However, your prompt contains at least 8193
# input tokens, which exceeds this limit even without any output tokens."
_VLLM_OVERFLOW = re.compile(r"maximum context length is (\d+) tokens\. However, your prompt contains "
                            r"(?:at least )?(\d+) input tokens")


def context_overflow(err: Any) -> InvalidRequest | None:
    """llama-server's `exceed_context_size_error` (and vLLM's overflow) in the words of Anthropic's API.

    Claude Code recognises a prompt that no longer fits only by this message, `prompt is too long:
    N tokens > M maximum` on a 400 (it parses N and M to know how much to drop): with it, it
    compacts the conversation and goes on; with llama-server's own words it shows an API error and
    the session is stuck. llama-server sends it as an HTTP 400, streaming or not (the check runs
    before the first event); `relay._as_anthropic_error` hands an `error` event's data here too.
    """
    if not isinstance(err, dict):
        return None
    vllm = _VLLM_OVERFLOW.search(str(err.get("message", ""))) if err.get("type") != "exceed_context_size_error" \
        else None
    if vllm is not None:
        return InvalidRequest(f"prompt is too long: {vllm[2]} tokens > {vllm[1]} maximum")
    if err.get("type") != "exceed_context_size_error":
        return None
    n, limit = err.get("n_prompt_tokens"), err.get("n_ctx")
    if not (isinstance(n, int) and isinstance(limit, int) and n > 0 and limit > 0):
        found = _OVERFLOW_NUMBERS.search(str(err.get("message", "")))
        if found is None:
            return None
        n, limit = int(found[1]), int(found[2])
    # llama-server also refuses a prompt of exactly n_ctx tokens (no room for one output token):
    # then the most it takes is n_ctx - 1, and "N > M" must stay true for Claude Code's arithmetic.
    limit = min(limit, n - 1)
    return InvalidRequest(f"prompt is too long: {n} tokens > {limit} maximum")
