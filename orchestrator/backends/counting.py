"""count_tokens without a generation slot: the backend's count if it answers fast, else an estimate.

Claude Code's `/context` fires 11-25 of these at once and counts the same tool
schemas again and again, so answers are cached by content and identical calls
in flight share one backend request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from typing import Any, Callable

from ..config import BackendConfig
from ..conversation import fold_system_messages, folds_system
from ..engines.upstream import UpstreamClient, read_whole
from ..errors import GatewayError
from ..jsonvalues import INLINE_BYTES, is_int, utf8_json
from ..splice import splice

COUNTED_FIELDS = ("system", "messages", "tools", "tool_choice", "thinking")
# A count is a few bytes of JSON; more is not a count.
MAX_ANSWER_BYTES = 64 * 1024


def _canonical(body: dict[str, Any]) -> str:
    relevant = {k: body[k] for k in COUNTED_FIELDS if k in body}
    # ASCII: every string has a form, lone surrogates included; only the key and the estimate use it.
    return json.dumps(relevant, sort_keys=True, separators=(",", ":"))


def content_key(body: dict[str, Any]) -> str:
    """Same content, same key, whatever the model name or field order."""
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def estimate_tokens(body: dict[str, Any]) -> int:
    """About 4 characters a token for English and JSON; only used when the backend cannot count."""
    return max(1, (len(_canonical(body)) + 3) // 4)


def _prepare(body: dict[str, Any]) -> tuple[str, int, bytes]:
    """(cache key, estimate, what to send the backend) from one serialisation."""
    canon = _canonical(body)
    payload = utf8_json({k: body[k] for k in ("model", *COUNTED_FIELDS) if k in body})
    return hashlib.sha256(canon.encode()).hexdigest(), max(1, (len(canon) + 3) // 4), payload


class TokenCounter:
    def __init__(self, upstream: UpstreamClient, *, timeout: float, max_entries: int = 4096,
                 concurrency: int = 4, on_source: Callable[[str], None] | None = None) -> None:
        self._upstream = upstream
        self._timeout = timeout
        self._max_entries = max_entries
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[int | None]] = {}
        # The backend tokenizes on its HTTP threads; don't take all of them.
        self._limit = asyncio.Semaphore(concurrency)
        self._on_source = on_source or (lambda source: None)

    async def count(self, backend: BackendConfig | None, body: dict[str, Any], *, size: int = 0,
                    raw: bytes | None = None, model: str | None = None) -> int:
        """`size`: the body's size in bytes, when known; a large one is serialised off the event loop.
        `raw`: the client's own count_tokens body; a large one is hashed and sent as it is, never
        re-serialised (json.dumps of 30 MB holds the interpreter, and so the event loop, for 0.2 s).
        `model`: the name the backend's engine answers to (vLLM refuses any other), None: the client's."""
        if backend is not None:  # counted as it would be sent (conversation.py, request/routing.py)
            out = (fold_system_messages(body) if folds_system(backend) else None) or body
            if model and body.get("model") != model:
                out = {**out, "model": model}
            if out is not body:  # spliced into the client's bytes (splice.py), else re-serialised
                big = raw is not None and len(raw) > INLINE_BYTES
                spliced = (await asyncio.to_thread(splice, body, out, raw) if big
                           else splice(body, out, raw) if raw is not None else None)
                body, size, raw = out, max(size, len(raw or b"")), spliced
        if raw is not None and len(raw) > INLINE_BYTES:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())  # releases the GIL
            key, estimate, payload = f"raw:{digest}", max(1, (len(raw) + 3) // 4), raw
        elif max(size, len(raw or b"")) <= INLINE_BYTES:
            key, estimate, payload = _prepare(body)
        else:
            key, estimate, payload = await asyncio.to_thread(_prepare, body)
        if key in self._cache:
            self._cache.move_to_end(key)
            self._on_source("cache")
            return self._cache[key]
        exact: int | None = None
        if backend is not None:
            shared = self._inflight.get(key)
            if shared is not None:
                exact = await asyncio.shield(shared)
            else:
                fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
                try:
                    exact = await self._ask_backend(backend, payload)
                finally:
                    del self._inflight[key]
                    fut.set_result(exact)
        if exact is None:
            self._on_source("estimate")
            return estimate
        self._on_source("backend")
        self._cache[key] = exact
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return exact

    async def _ask_backend(self, backend: BackendConfig, payload: bytes) -> int | None:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._limit:
                    async with self._upstream.post(backend, "/v1/messages/count_tokens", payload,
                                                   {"Content-Type": "application/json"}) as resp:
                        if resp.status != 200:
                            return None
                        answer = json.loads(await read_whole(resp, MAX_ANSWER_BYTES, backend))
        except (TimeoutError, GatewayError, ValueError, RecursionError):
            return None
        n = answer.get("input_tokens") if isinstance(answer, dict) else None
        return n if is_int(n) and n >= 0 else None
