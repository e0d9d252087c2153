"""Which engine is behind a backend, from its config, and the one it is found to be when the config
cannot say.

No config key names the engine. A supervised backend (a `command`) is llama-server: supervisord
runs it as `llama-NAME`, with `--slot-save-path` added when it saves; so is a backend given a
`kv_save_dir` (its --slot-save-path). Any other backend is a server run by someone else, asked as
the gateway always asked it: llama-server's /props first, and when that gives no context, the
/v1/models that vLLM and SGLang serve. Which of them answered decides the rest (an engine named
there is asked as its adapter says; any other, as llama-server).
"""

from __future__ import annotations

from typing import Any

from ..config import BackendConfig
from .base import Engine, Load, Served, ServerId, listed_model, positive
from .llama_server import LlamaServer, n_ctx, served_of
from .model_cache import ModelCache
from .sglang import SGLang
from .upstream import UpstreamClient
from .vllm import Vllm

# /v1/models' `owned_by`, as each engine writes it.
BY_OWNER: dict[str, type[Engine]] = {"vllm": Vllm, "sglang": SGLang}


def engine_for(backend: BackendConfig, upstream: UpstreamClient) -> Engine:
    """The engine adapter of `backend` (see the module's docstring)."""
    if backend.command or backend.kv_save_dir:
        return LlamaServer(backend, upstream)
    return Unnamed(backend, upstream)


class Unnamed(Engine):
    """A server run by someone else, its engine named nowhere: llama-server until its context is
    read from /v1/models, then the engine /v1/models names, if it has an adapter."""

    kind = "unnamed"

    def __init__(self, backend: BackendConfig, upstream: UpstreamClient) -> None:
        super().__init__(backend, upstream)
        self.llama = LlamaServer(backend, upstream)
        # What it was found to be when its context was last read (each start of the server).
        self.found: Engine = self.llama

    async def context_size(self, timeout: float) -> int | None:
        n = n_ctx(await self.llama.props(timeout))
        if n is not None:
            self.found = self.llama
            return positive(n)
        model = await listed_model(self, timeout)
        owner = BY_OWNER.get(str(model.get("owned_by")))
        self.found = owner(self.backend, self.upstream) if owner is not None else self.llama
        return positive(model.get("max_model_len"))

    async def describe(self, timeout: float) -> Served:
        props = await self.llama.props(timeout)
        if n_ctx(props) is not None:
            self.found = self.llama
            return served_of(props)
        model = await listed_model(self, timeout)
        owner = BY_OWNER.get(str(model.get("owned_by")))
        if owner is None:
            self.found = self.llama
            return Served(n_ctx=positive(model.get("max_model_len")))
        self.found = owner(self.backend, self.upstream)
        self.found.command_line = self.command_line
        return await self.found.describe(timeout)

    # Slots are saved only with a folder named, and then the engine is llama-server: not here.

    async def slot_tokens(self) -> int:
        return await self.found.slot_tokens()

    async def identify(self, warm: bool) -> None:
        await self.found.identify(warm)

    async def server_id(self) -> ServerId | None:
        return await self.found.server_id()

    async def slots(self, timeout: float) -> list[Any] | None:
        return await self.found.slots(timeout)

    async def processing(self) -> int | None:
        return await self.found.processing()

    async def prompt_usage(self, timeout: float) -> dict[str, int] | None:
        return await self.found.prompt_usage(timeout)

    async def load(self, timeout: float) -> Load | None:
        return await self.found.load(timeout)

    async def model_cache(self) -> ModelCache | None:
        return await self.found.model_cache()
