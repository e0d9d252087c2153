"""vLLM, as the gateway uses it today: it serves the Anthropic Messages API and count_tokens itself,
answers /health with an empty 200, and lists its context (`--max-model-len`) as `max_model_len` in
/v1/models. It keeps its own prefix cache and writes no slot files: nothing to save or restore, and
no view of what it is processing that the gateway reads (let-go unknown)."""

from __future__ import annotations

from .base import Engine, listed_context


class Vllm(Engine):
    kind = "vllm"

    async def context_size(self, timeout: float) -> int | None:
        return await listed_context(self, timeout)
