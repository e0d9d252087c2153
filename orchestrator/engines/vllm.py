"""vLLM, as the gateway uses it: it serves the Anthropic Messages API and count_tokens itself, answers
/health with an empty 200, and lists in /v1/models the one name it answers to (any other gets a 404)
and its context (`--max-model-len`, as `max_model_len`; a max_tokens over it gets a 400). It keeps
its own prefix cache and writes no slot files: nothing to save or restore, and no view of what it
is processing that the gateway reads (let-go unknown)."""

from __future__ import annotations

from .base import Engine, Served, listed_context, listed_model, positive


class Vllm(Engine):
    kind = "vllm"

    async def context_size(self, timeout: float) -> int | None:
        return await listed_context(self, timeout)

    async def describe(self, timeout: float) -> Served:
        model = await listed_model(self, timeout)
        n_ctx = positive(model.get("max_model_len"))
        name = model.get("id")
        return Served(n_ctx=n_ctx, model=name if isinstance(name, str) and name else None, max_tokens=n_ctx)
