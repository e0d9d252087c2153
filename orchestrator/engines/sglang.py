"""SGLang, as the gateway uses it today: it serves the Anthropic Messages API and count_tokens itself,
answers /health, and lists its context as `max_model_len` in /v1/models. Its radix cache is its own:
no slot files to save or restore, and no view of what it is processing that the gateway reads
(let-go unknown)."""

from __future__ import annotations

from .base import Engine, listed_context


class SGLang(Engine):
    kind = "sglang"

    async def context_size(self, timeout: float) -> int | None:
        return await listed_context(self, timeout)
