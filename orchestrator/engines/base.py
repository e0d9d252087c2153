"""What the gateway asks of the engine behind a backend: one interface, one adapter per engine.

Everything the gateway knows about a server beyond the Anthropic Messages API it forwards goes
through an `Engine`: whether it is up, the context a request may fill, whether it can save and
restore its slot (and doing so), the tokens its slot holds, which server it is (what a save must
have been written by), and how many requests it is still processing (has it let go of one the
gateway abandoned). Each adapter holds its backend's config and the gateway's one HTTP client,
as an httpx transport holds its connections, so a test can give a backend an engine of its own
(`build_gateway(..., engines=...)`) and no socket is opened.

The defaults here are what the gateway can say of a server it knows only by its HTTP API: up when
its health path answers, no context known, no slot saves, let-go unknown. An adapter overrides
what its engine can do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..config import BackendConfig
from ..errors import GatewayError
from ..jsonvalues import is_int
from .fingerprint import same
from .model_cache import ModelCache
from .upstream import UpstreamClient


@dataclass(frozen=True)
class ServerId:
    """What a slot save must have been written by (kv/server_id.py says why each field)."""

    model: str
    n_ctx: int
    build: str
    model_file: str = ""   # "SIZE:MTIME_NS" of the model file, "" when not readable from here
    kv_args: str = ""      # the options that change the KV, and their values, from the configured command
    lora: str = ""         # its LoRA adapters, as the server reports them
    probe: str = ""        # a server run by hand: its answer to the probe (fingerprint.py); "" supervised

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, meta: dict[str, Any]) -> str:
        """'' when `meta` was written by this server; else what differs."""
        return ", ".join(f"{k} {meta.get(k)!r} (server: {v!r})" for k, v in self.fields().items()
                         if (meta.get(k) != v if k != "probe" else not (v == meta.get(k, "") or same(meta.get(k), v))))


@dataclass(frozen=True)
class Served:
    """What an engine says of itself, read at each (re)start: what a request sent to it must fit."""

    n_ctx: int | None = None       # the context one request may fill; None: unknown
    model: str | None = None       # the model name it answers to (vLLM 404s any other); None: any name
    batch: int | None = None       # requests it runs at once (llama-server's slots, vLLM's --max-num-seqs)
    # The most max_tokens it takes (vLLM refuses more than its max_model_len with a 400; llama-server
    # stops at its context by itself); None: no bound to clamp to.
    max_tokens: int | None = None


@dataclass(frozen=True)
class Load:
    """What an engine says it is doing now, all clients' requests counted (vLLM's /metrics)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float | None = None  # the share of its KV cache in use, 0..1


class Engine:
    """The engine behind one backend, as the gateway asks it."""

    # Its name in logs and tests.
    kind: ClassVar[str] = "unknown"

    def __init__(self, backend: BackendConfig, upstream: UpstreamClient) -> None:
        self.backend = backend
        self.upstream = upstream
        # The command line its process runs, where the gateway can read it (a supervised one's, set by
        # backends/health.py at each start); None: only its configured command is known.
        self.command_line: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend.name} {self.backend.url}>"

    async def health(self, timeout: float) -> int:
        """The HTTP status of its health probe (503: loading); a GatewayError when it does not answer.
        No health endpoint at all (health_path ""): any HTTP answer from its root means up."""
        status, _ = await self.upstream.get_json(self.backend, self.backend.health_path or "/", timeout=timeout)
        return status

    async def context_size(self, timeout: float) -> int | None:
        """The context one request may fill, None when unknown. May raise a GatewayError."""
        return None

    async def describe(self, timeout: float) -> Served:
        """What it serves (Served); by default only its context. May raise a GatewayError."""
        return Served(n_ctx=await self.context_size(timeout))

    async def load(self, timeout: float) -> Load | None:
        """What it is running and holding now, other clients' requests included; None when it does not
        say (placement then counts only the gateway's own). May raise a GatewayError."""
        return None

    def saves_slots(self) -> bool:
        """Whether the gateway saves and restores this backend's slot: the engine can, and its config asks."""
        return False

    async def save_slot(self, filename: str, timeout: float) -> dict[str, Any]:
        """Write the slot to `filename` in its save folder; the engine's answer, or a GatewayError."""
        raise GatewayError(f"{self.kind} does not save slots")

    async def restore_slot(self, filename: str, timeout: float) -> dict[str, Any]:
        """Read the slot back from `filename`; the engine's answer, or a GatewayError."""
        raise GatewayError(f"{self.kind} does not restore slots")

    async def slot_tokens(self) -> int:
        """Tokens its slot holds now (0 when empty or unknown); never raises."""
        return 0

    async def server_id(self) -> ServerId | None:
        """Which server this is, as a save records it; None when it cannot say (no save, no restore)."""
        return None

    async def identify(self, warm: bool) -> None:
        """The server has (re)started, its slot `warm` or empty: learn what it must be known by, before
        any save is restored into it (fingerprint.py). By default nothing to learn."""

    async def model_cache(self) -> ModelCache | None:
        """What kind of cache its model keeps and whether a slot restore can bring it back
        (model_cache.py); None when it cannot say. Never raises."""
        return None

    async def slots(self, timeout: float) -> list[Any] | None:
        """Its slots as it describes them (the /dashboard page shows them); None when it has no such view."""
        return None

    async def prompt_usage(self, timeout: float) -> dict[str, int] | None:
        """The prompt figures (`input_tokens` computed, `cache_read_input_tokens`) of the one request it
        is generating for now, for an answer whose stream left them out; None when it cannot tell.
        May raise a GatewayError."""
        return None

    async def processing(self) -> int | None:
        """How many requests it is processing now, None when it cannot tell (let-go unknown: the slot is
        free once the connection closed). UpstreamUnavailable when it does not answer (nothing runs
        there); another GatewayError when this one look failed (ask again)."""
        return None


async def listed_model(engine: Engine, timeout: float) -> dict[str, Any]:
    """The first model of the OpenAI-style /v1/models that vLLM and SGLang serve ({} when none): its
    `max_model_len` is the context, its `owned_by` names the engine ("vllm", "sglang", "llamacpp")."""
    status, models = await engine.upstream.get_json(engine.backend, "/v1/models", timeout=timeout)
    data = models.get("data") if status == 200 and isinstance(models, dict) else None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}


async def listed_context(engine: Engine, timeout: float) -> int | None:
    """The context /v1/models lists (vLLM's and SGLang's `max_model_len`), None when it lists none."""
    return positive((await listed_model(engine, timeout)).get("max_model_len"))


def positive(n: Any) -> int | None:
    """A count the engine reported, None unless a positive integer."""
    return n if is_int(n) and n > 0 else None
