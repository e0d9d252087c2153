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

import aiohttp

from .config import BackendConfig
from .errors import GatewayError
from .upstream import UpstreamClient

COUNTED_FIELDS = ("system", "messages", "tools", "tool_choice", "thinking")


def content_key(body: dict[str, Any]) -> str:
    """Same content, same key, whatever the model name or field order."""
    relevant = {k: body[k] for k in COUNTED_FIELDS if k in body}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def estimate_tokens(body: dict[str, Any]) -> int:
    """About 4 characters a token for English and JSON; only used when the backend cannot count."""
    relevant = {k: body[k] for k in COUNTED_FIELDS if k in body}
    chars = len(json.dumps(relevant, ensure_ascii=False, separators=(",", ":")))
    return max(1, (chars + 3) // 4)


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

    async def count(self, backend: BackendConfig | None, body: dict[str, Any]) -> int:
        key = content_key(body)
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
                    exact = await self._ask_backend(backend, body)
                finally:
                    del self._inflight[key]
                    fut.set_result(exact)
        if exact is None:
            self._on_source("estimate")
            return estimate_tokens(body)
        self._on_source("backend")
        self._cache[key] = exact
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return exact

    async def _ask_backend(self, backend: BackendConfig, body: dict[str, Any]) -> int | None:
        payload = {k: body[k] for k in ("model", *COUNTED_FIELDS) if k in body}
        try:
            async with asyncio.timeout(self._timeout):
                async with self._limit:
                    async with self._upstream.post(backend, "/v1/messages/count_tokens",
                                                   json.dumps(payload).encode(),
                                                   {"Content-Type": "application/json"}) as resp:
                        if resp.status != 200:
                            return None
                        answer = await resp.json(content_type=None)
        except (TimeoutError, GatewayError, ValueError, aiohttp.ClientError, OSError):
            return None
        n = answer.get("input_tokens") if isinstance(answer, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
