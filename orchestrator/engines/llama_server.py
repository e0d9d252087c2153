"""What the gateway knows of llama-server: its process under supervisord, where it saves its slots,
its slot's actions (save, restore) and what the slot holds, its /props (context, identity) and its
/slots (what it is processing).

The two calls the KV store makes to the server about slot 0 are each bounded, and turn every
failure into a GatewayError (an action) or "nothing held" (the tokens), never raising past that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from ..config import BackendConfig
from ..errors import GatewayError
from ..jsonvalues import is_int
from . import fingerprint
from .base import Engine, Served, ServerId, listed_context, positive
from .model_cache import ModelCache, command_model, of_file, server_options
from .rpc_workers import with_rpc
from .upstream import read_whole

log = logging.getLogger(__name__)

# Only slot 0 is saved and restored: a workstation runs --parallel 1.
SLOT = 0
PROPS_TIMEOUT = 5.0
# The probe is one prefill of 31 tokens: seconds at most on a big model, loaded.
PROBE_TIMEOUT = 120.0
# A look at /slots while a backend may be deep in a long batch.
SLOTS_TIMEOUT = 5.0
# llama-server answers a slot action with a small JSON object.
MAX_ACTION_ANSWER_BYTES = 64 * 1024
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


class LlamaServer(Engine):
    """llama.cpp's llama-server: /props, /slots and its slot actions."""

    kind = "llama-server"
    # What a server run by hand is known by (fingerprint.py), set at each of its starts by `identify`.
    probe: str = ""
    # The last model read, by its path, file identity and --swa-full bound: a restart with the same
    # file reads nothing.
    _model: tuple[tuple[str, str, float], ModelCache] | None = None

    async def props(self, timeout: float) -> dict[str, Any] | None:
        """Its /props, None unless it answers 200 with an object. A GatewayError when it does not answer."""
        status, props = await self.upstream.get_json(self.backend, "/props", timeout=timeout)
        return props if status == 200 and isinstance(props, dict) else None

    async def context_size(self, timeout: float) -> int | None:
        """The per-slot n_ctx: what one request may fill. A `command` is free-form, so a supervised
        backend may be another engine: one whose /props has no n_ctx is asked /v1/models, as before."""
        n = n_ctx(await self.props(timeout))
        return positive(n) if n is not None else await listed_context(self, timeout)

    async def describe(self, timeout: float) -> Served:
        """Its per-slot n_ctx and slot count (/props' total_slots); another engine's context when its
        /props has no n_ctx (as context_size)."""
        props = await self.props(timeout)
        if n_ctx(props) is None:
            return Served(n_ctx=await listed_context(self, timeout))
        return served_of(props)

    def saves_slots(self) -> bool:
        return saves_slots(self.backend)

    async def save_slot(self, filename: str, timeout: float) -> dict[str, Any]:
        return await self._slot_action("save", filename, timeout)

    async def restore_slot(self, filename: str, timeout: float) -> dict[str, Any]:
        return await self._slot_action("restore", filename, timeout)

    async def _slot_action(self, action: str, filename: str, timeout: float) -> dict[str, Any]:
        """POST /slots/0?action=...; its JSON answer, or a GatewayError saying why not."""
        data = json.dumps({"filename": filename}).encode()
        async with self.upstream.post(self.backend, f"/slots/{SLOT}?action={action}", data,
                                      {"Content-Type": "application/json"}, timeout=timeout) as resp:
            raw = await read_whole(resp, MAX_ACTION_ANSWER_BYTES, self.backend)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if resp.status != 200 or not isinstance(answer, dict):
            message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
            raise GatewayError(f"HTTP {resp.status}: {message or raw[:200]!r}")
        return answer

    async def identify(self, warm: bool) -> None:
        """A server run by hand: its probe figures when its slot is seen empty, else what it was known
        by (a warm slot: the same process, most likely after a blip of its health), else an identity
        of this up-period only (fingerprint.py). A supervised one is known by its command."""
        if self.backend.command:
            return
        if warm or not await self._slot_seen_empty():  # the probe would overwrite what it holds
            self.probe = self.probe or fingerprint.unknown()
            return
        figures = None
        try:
            async with self.upstream.post(self.backend, "/completion", fingerprint.request_body(),
                                          {"Content-Type": "application/json"}, timeout=PROBE_TIMEOUT) as resp:
                raw = await read_whole(resp, MAX_ACTION_ANSWER_BYTES, self.backend)
            figures = fingerprint.of_answer(json.loads(raw)) if resp.status == 200 else None
        except (GatewayError, ValueError) as e:
            log.warning("backend %s: its probe failed (%s): its saves restore into this process only",
                        self.backend.name, getattr(e, "message", e))
        self.probe = figures or fingerprint.unknown()

    async def _slot_seen_empty(self) -> bool:
        """/slots read, and slot 0 holds no prompt tokens (unreadable: not seen empty)."""
        try:
            slots = await self.slots(PROPS_TIMEOUT)
        except GatewayError:
            return False
        slot = next((s for s in slots or () if isinstance(s, dict) and s.get("id") == SLOT), None)
        return slot is not None and slot.get("n_prompt_tokens", 0) == 0 and not slot.get("is_processing")

    async def slot_tokens(self) -> int:
        """Tokens slot 0's last task had as its prompt (0 when empty or unknown). llama-server shows 0
        after a restore, whatever the restore put back."""
        try:
            slots = await self.slots(PROPS_TIMEOUT)
        except GatewayError:
            return 0
        for s in slots or ():
            if isinstance(s, dict) and s.get("id") == SLOT and isinstance(s.get("n_prompt_tokens"), int):
                return s["n_prompt_tokens"]
        return 0

    async def slots(self, timeout: float) -> list[Any] | None:
        """Its /slots, None when it has none (not llama-server, or --no-slots). A GatewayError when it
        does not answer."""
        status, slots = await self.upstream.get_json(self.backend, "/slots", timeout=timeout)
        return slots if status == 200 and isinstance(slots, list) else None

    async def prompt_usage(self, timeout: float) -> dict[str, int] | None:
        """From /slots: the processed and cached prompt tokens of the one slot generating now, else of
        a lone slot's last task (an answer can end before this look: the gateway's queue gave that slot
        to this request). None when which slot is unclear or it does not say."""
        slots = [s for s in await self.slots(timeout) or () if isinstance(s, dict)]
        busy = [s for s in slots if s.get("is_processing")]
        slot = busy[0] if len(busy) == 1 else slots[0] if not busy and len(slots) == 1 else None
        if slot is None:
            return None
        computed, cached = slot.get("n_prompt_tokens_processed"), slot.get("n_prompt_tokens_cache")
        if not (is_int(computed) and is_int(cached) and computed >= 0 and cached >= 0):
            return None
        return {"input_tokens": computed, "cache_read_input_tokens": cached}

    async def processing(self) -> int | None:
        slots = await self.slots(SLOTS_TIMEOUT)
        if slots is None:
            return None
        return sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))

    async def model_cache(self) -> ModelCache | None:
        """Its model's cache kind, from the GGUF at /props' model_path (read in a thread, once per
        file) and the configured command's options; None when /props does not answer."""
        try:
            props = await self.props(PROPS_TIMEOUT)
        except GatewayError:
            return None
        path = str((props or {}).get("model_path") or "")
        if not path:
            return None
        # --swa-full as the process runs it where that is known, else as `up` decides it (command_for).
        running = self.command_line
        added = (math.inf if server_options(running).get("swa_full") else 0) if running else adds_swa_full(self.backend)
        seen = (path, file_identity(path), added)
        if self._model is None or self._model[0] != seen:
            self._model = (seen, await asyncio.to_thread(of_file, path, self.backend.command, add_swa_full=added))
        return self._model[1]

    async def server_id(self) -> ServerId | None:
        """Its identity from /props and /lora-adapters, with the model file's size and time and the
        KV-changing options of its configured command (kv/server_id.py says why each)."""
        try:
            props = await self.props(PROPS_TIMEOUT)
        except GatewayError:
            return None
        if props is None:
            return None
        model = str(props.get("model_path", ""))
        try:
            status, adapters = await self.upstream.get_json(self.backend, "/lora-adapters", timeout=PROPS_TIMEOUT)
        except GatewayError:
            status, adapters = 0, None
        lora = json.dumps(adapters, sort_keys=True) if status == 200 and adapters else ""
        n = n_ctx(props)
        cache = await self.model_cache()
        command = supervised_command(self.backend.command, cache) if self.backend.command else None
        return ServerId(model, n if isinstance(n, int) else 0, str(props.get("build_info", "")),
                        file_identity(model), kv_args(command), lora, "" if command else self.probe)


def n_ctx(props: dict[str, Any] | None) -> Any:
    """The per-slot n_ctx in a /props answer, as given (None when absent)."""
    settings = props.get("default_generation_settings") if props is not None else None
    return settings.get("n_ctx") if isinstance(settings, dict) else None


def served_of(props: dict[str, Any] | None) -> Served:
    """What a /props answer says: the per-slot context; any model name is taken. Its slot count
    (`total_slots`) is not taken as the batch: the gateway's saves and parking are slot 0's, and a
    llama-server started without --parallel picks several slots itself; `slots` says otherwise."""
    return Served(n_ctx=positive(n_ctx(props)))


# ---- what identifies a server's KV cache -------------------------------------------------------

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


# ---- its process and its save folder -------------------------------------------------------------

def program_name(backend: BackendConfig) -> str:
    return f"llama-{backend.name}"


def slot_dir(var: Path, backend: BackendConfig) -> Path:
    """A backend's slot save folder: its kv_save_dir, else var/slots/NAME."""
    return Path(backend.kv_save_dir) if backend.kv_save_dir else var / "slots" / backend.name


def adds_swa_full(backend: BackendConfig) -> float:
    """The most KV bytes --swa-full may add for the gateway to put it on this backend's command when its
    model has a sliding window (0: never): a supervised server whose slot is saved, unless the config
    says no."""
    if not (backend.kv_swa_full and backend.command and saves_slots(backend)):
        return 0
    return backend.kv_swa_full_max_mib * 2 ** 20


def supervised_command(command: str, model: ModelCache | None) -> str:
    """`command` as supervisord runs it: with --swa-full when the model's judgement added it."""
    return f"{command} --swa-full" if model is not None and model.swa_full_added else command


def command_for(backend: BackendConfig, command: str) -> tuple[str, ModelCache | None]:
    """The rendered `command` of a supervised backend as it is run (with its RPC workers and
    --swa-full where they apply), and its model's judgement (None when the command names no model
    file)."""
    command = with_rpc(backend, command)
    path = command_model(command)
    if not path:
        return command, None
    model = of_file(path, command, add_swa_full=adds_swa_full(backend))
    return supervised_command(command, model), model


def saves_slots(backend: BackendConfig) -> bool:
    """Supervised main backends save by default; a server run by someone else only with its folder
    named. A background model has no conversation worth keeping."""
    return backend.role == "main" and backend.kv_save and bool(backend.command or backend.kv_save_dir)
