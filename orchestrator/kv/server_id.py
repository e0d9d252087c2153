"""What a KV save must match before it is restored: the server that wrote it, and its own bytes.

llama-server restores any file of the right shape: a save written with another
`--rope-freq-base` (same model path, context size and build) or with bytes
overwritten in place is `restored` and the model then answers garbage, which
is saved again under the same key. So a save records everything that changes
what the KV cache means, and a checksum of the file; both are checked first.

What changes the KV: the model file (its path, size and modification time:
a file replaced under the same name), the context size, the build, LoRA
adapters, and the command-line settings /props does not report (rope and
YaRN scaling, cache types, flash attention, SWA, control vectors, overridden
GGUF keys), taken from the backend's configured command. A server run by hand
(no command) is identified by what /props and /lora-adapters say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import BackendConfig
from ..engines.upstream import UpstreamClient
from ..errors import GatewayError

PROPS_TIMEOUT = 5.0
# llama-server options that change what a saved KV cache means (llama.cpp's common/arg.cpp).
KV_FLAGS = frozenset({
    "--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx",
    "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast", "--lora",
    "--lora-scaled", "--lora-init-without-apply", "--control-vector", "--control-vector-scaled",
    "--control-vector-layer-range", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-fa",
    "--flash-attn", "--swa-full", "--override-kv", "-kvu", "--kv-unified",
})
# Options followed by two values.
_TWO_VALUES = frozenset({"--lora-scaled", "--control-vector-scaled", "--control-vector-layer-range"})
# Read in chunks: a save is gigabytes on a big model and must not sit in memory whole.
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerId:
    """What a save must have been written by."""

    model: str
    n_ctx: int
    build: str
    model_file: str = ""   # "SIZE:MTIME_NS" of the model file, "" when not readable from here
    kv_args: str = ""      # KV_FLAGS and their values, from the configured command line
    lora: str = ""         # /lora-adapters, as llama-server reports them

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, meta: dict[str, Any]) -> str:
        """'' when `meta` was written by this server; else what differs."""
        return ", ".join(f"{k} {meta.get(k)!r} (server: {v!r})" for k, v in self.fields().items()
                         if meta.get(k) != v)


def file_identity(path: str) -> str:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def kv_args(command: str | None) -> str:
    """The options of `command` that change the KV cache, in order, with their values."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return command or ""  # unparseable: the whole line identifies it
    out: list[str] = []
    i = 0
    while i < len(words):
        flag, eq, value = words[i].partition("=")
        if flag in KV_FLAGS:
            if eq:
                out.append(f"{flag}={value}")
            else:
                n = 2 if flag in _TWO_VALUES else 1
                values = [w for w in words[i + 1:i + 1 + n] if not w.startswith("-") or _number(w)]
                out.append(" ".join([flag, *values]))
                i += len(values)
        i += 1
    return " ".join(out)


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


async def server_id(upstream: UpstreamClient, backend: BackendConfig) -> ServerId | None:
    """This server's identity, or None when /props cannot be read (no save, no restore)."""
    try:
        status, props = await upstream.get_json(backend, "/props", timeout=PROPS_TIMEOUT)
    except GatewayError:
        return None
    if status != 200 or not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    model = str(props.get("model_path", ""))
    try:
        status, adapters = await upstream.get_json(backend, "/lora-adapters", timeout=PROPS_TIMEOUT)
    except GatewayError:
        status, adapters = 0, None
    lora = json.dumps(adapters, sort_keys=True) if status == 200 and adapters else ""
    return ServerId(model, n_ctx if isinstance(n_ctx, int) else 0, str(props.get("build_info", "")),
                    file_identity(model), kv_args(backend.command), lora)


def checksum(path: Path) -> str:
    """SHA-256 of the file (hashlib releases the interpreter while it hashes: run it in a thread)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
