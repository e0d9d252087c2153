"""vLLM, as the gateway uses it: it serves the Anthropic Messages API and count_tokens itself, answers
/health with an empty 200, and lists in /v1/models the one name it answers to (any other gets a 404)
and its context (`--max-model-len`, as `max_model_len`; a max_tokens over it gets a 400, a prompt plus
max_tokens over it is cut to fit by vLLM itself). It keeps its own prefix cache and writes no slot
files: nothing to save or restore, and no view of what it is processing that the gateway reads
(let-go unknown).

How many requests it runs at once (`--max-num-seqs`) it reports nowhere, neither in /v1/models nor
in /metrics (vLLM 0.32): it is read from its command line where this machine shows it (a supervised
one's, or the process listening on a loopback URL's port), else taken as what its KV cache holds at
full context (/metrics' `vllm:cache_config_info{kv_cache_max_concurrency}`), else unknown (one, unless
the config's `slots` says)."""

from __future__ import annotations

import math
import re

from ..errors import GatewayError
from .base import Engine, Load, Served, listed_context, listed_model, positive
from .local_process import option

METRICS_TIMEOUT = 5.0
# vLLM's /metrics is some 100 kB of text.
MAX_METRICS_BYTES = 4 * 1024 * 1024
_GAUGE = re.compile(r"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)"
                    r"(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)
_CONCURRENCY = re.compile(r'^vllm:cache_config_info\{[^}]*kv_cache_max_concurrency="([0-9.eE+-]+)"', re.M)


class Vllm(Engine):
    kind = "vllm"

    async def context_size(self, timeout: float) -> int | None:
        return await listed_context(self, timeout)

    async def describe(self, timeout: float) -> Served:
        model = await listed_model(self, timeout)
        n_ctx = positive(model.get("max_model_len"))
        name = model.get("id")
        return Served(n_ctx=n_ctx, model=name if isinstance(name, str) and name else None, max_tokens=n_ctx,
                      batch=await self.batch())

    async def batch(self) -> int | None:
        """--max-num-seqs as it runs (the module's docstring says where from); None when unknown."""
        seqs = option(self.command_line or self.backend.command, "--max-num-seqs", "--max_num_seqs")
        if seqs is not None and seqs.isdigit():
            return positive(int(seqs))
        try:
            text = await self.metrics(METRICS_TIMEOUT)
        except GatewayError:
            return None
        found = _CONCURRENCY.search(text or "")
        try:
            return max(1, math.floor(float(found.group(1)))) if found else None
        except (ValueError, OverflowError):
            return None

    async def metrics(self, timeout: float) -> str | None:
        """Its /metrics' text, None unless it answers 200. A GatewayError when it does not answer."""
        status, text = await self.upstream.get_text(self.backend, "/metrics", timeout=timeout, limit=MAX_METRICS_BYTES)
        return text if status == 200 else None

    async def load(self, timeout: float) -> Load | None:
        """Its running and waiting requests and KV use, summed over its engines (/metrics' gauges)."""
        text = await self.metrics(timeout)
        if not text:
            return None
        sums: dict[str, float] = {}
        for name, value in _GAUGE.findall(text):
            try:
                sums[name] = sums.get(name, 0.0) + float(value)
            except ValueError:
                continue
        if "vllm:num_requests_running" not in sums:
            return None
        kv = sums.get("vllm:kv_cache_usage_perc")
        return Load(running=int(sums["vllm:num_requests_running"]), waiting=int(sums.get("vllm:num_requests_waiting", 0)),
                    kv_usage=kv)
