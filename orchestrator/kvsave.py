"""KV persistence: a backend's slot saved to disk when idle, restored before its queue reopens.

A crashed or stopped llama-server comes back with an empty prompt cache, and the
next turn would re-process the whole conversation (minutes on a big model). So
once a main request has finished and the slot has been idle for a moment with
nobody waiting, the slot is saved (`POST /slots/0?action=save`) while the
gateway holds every slot of the backend, so no generation overlaps the save.
When the backend comes back, `health` awaits `restore` before it reopens the
queue: the save of the first waiting request's conversation, else the newest.

Each save is a pair in the backend's folder: `KEY-MS.bin`, llama-server's own
file, and `KEY.json`, what identifies the server that wrote it (model, context
size, build) and what the file must be (its size). The pair is keyed by the
conversation's prefix, so each conversation keeps its newest save. Nothing here
ever raises into its caller: a missing, foreign or corrupt save, a full disk or
a failed request is one warning line and a count, and the backend goes on cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .affinity import Conversation
from .config import BackendConfig, Config
from .errors import GatewayError
from .metrics import Metrics
from .prefixes import for_waiter
from .slots import Lease, SlotQueue
from .supervise import saves_slots, slot_dir
from .upstream import UpstreamClient, read_whole

log = logging.getLogger(__name__)

# Only slot 0 is saved and restored: a workstation runs --parallel 1.
SLOT = 0
# Writing or reading gigabytes takes seconds; a server that takes longer is stuck,
# and the backend must not stay closed because of it.
SAVE_TIMEOUT = 120.0
RESTORE_TIMEOUT = 120.0
PROPS_TIMEOUT = 5.0
# llama-server answers a slot action with a small JSON object.
MAX_ACTION_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerId:
    """What a save must have been written by: the same model, context size and build."""

    model: str
    n_ctx: int
    build: str

    def mismatch(self, meta: dict[str, Any]) -> str:
        """'' when `meta` was written by this server; else what differs."""
        diffs = [f"{k} {meta.get(k)!r} (server: {getattr(self, k)!r})" for k in ("model", "n_ctx", "build")
                 if meta.get(k) != getattr(self, k)]
        return ", ".join(diffs)


@dataclass
class BackendSaves:
    """One backend's saving state and folder."""

    backend: BackendConfig
    queue: SlotQueue
    folder: Path
    latest: tuple[Conversation, int] | None = None  # the last finished request's conversation, tokens
    saved: dict[str, int] = field(default_factory=dict)  # conversation key -> tokens at its last save
    generation: int = 0                          # bumped by every finished request
    waiting: dict[int, Conversation] = field(default_factory=dict)  # waiting requests, first come first
    saving: bool = False
    # The conversation the slot was last given (parking.py); only once it ended whole is it `latest`.
    holder: str | None = None
    holder_whole: bool = False
    save_pace: float = 0.0  # seconds per token of the last save: what a park would hold the slot
# A save keeps its conversation's first block hashes: a waiter without a save of its own gets the
# save sharing its longest prefix (prefixes.py).
PREFIX_BLOCKS = 256


class KvPersistence:
    """The saves of every backend that has them: each backend's state is a `BackendSaves`,
    kept on the gateway's record of that backend and passed in."""

    def __init__(self, config: Config, upstream: UpstreamClient, metrics: Metrics) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self._var = Path(config.supervisor.log_dir).parent if config.supervisor.log_dir else None
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0

    def attach(self, backend: BackendConfig, queue: SlotQueue) -> BackendSaves | None:
        """The saving state of a main backend whose slot is saved, or None (nothing saved there)."""
        if backend.role != "main" or not saves_slots(backend) or (not backend.kv_save_dir and self._var is None):
            return None  # supervised, but run by hand without `up`: no folder known
        self.metrics.add_kv_backend(backend.name)
        return BackendSaves(backend, queue, slot_dir(self._var or Path("."), backend))

    # ---- what placement tells it -----------------------------------------------------------

    @contextlib.contextmanager
    def waiting(self, b: BackendSaves, conversation: Conversation) -> Iterator[None]:
        """Around a request's wait for a slot: a restore prefers the first waiter's conversation."""
        seq = self._next()
        b.waiting[seq] = conversation
        try:
            yield
        finally:
            b.waiting.pop(seq, None)

    def finished(self, b: BackendSaves, conversation: Conversation, tokens: int) -> None:
        """A main request ended whole on the backend: save once the slot has been idle a while."""
        if tokens <= 0:
            return
        b.latest = (conversation, tokens)
        b.generation += 1
        self._spawn(self._save_when_idle(b, b.generation), f"kv-save:{b.backend.name}")

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- saving ----------------------------------------------------------------------------

    async def _save_when_idle(self, b: BackendSaves, generation: int) -> None:
        await asyncio.sleep(b.backend.kv_save_idle_seconds)
        if b.generation == generation:  # else a later request finished: its own timer saves
            await self.save(b)

    def _idle_leases(self, b: BackendSaves) -> list[Lease] | None:
        """Every slot of the backend, taken at once, or None when any is busy or anyone waits:
        a save must never sit in front of a request, nor run beside a generation."""
        q = b.queue
        if not (q.is_open and q.busy == 0 and q.depth == 0):
            return None
        leases = []
        for _ in range(q.slots):
            lease = q.try_acquire()
            if lease is None:
                for held in leases:
                    held.release()
                return None
            leases.append(lease)
        return leases

    async def save(self, b: BackendSaves) -> str:
        """Save the slot now if it is idle and changed since its last save; the result, as counted."""
        if b.latest is None or b.saving:
            return "skipped"
        backend = b.backend.name
        key, tokens = b.latest[0].key, b.latest[1]
        if b.saved.get(key) == tokens:
            self.metrics.kv_saves.labels(backend, "unchanged").inc()
            return "unchanged"
        leases = self._idle_leases(b)
        if leases is None:
            self.metrics.kv_saves.labels(backend, "busy").inc()
            return "busy"  # the request that holds it saves when it finishes
        try:
            return (await self.save_held(b, b.latest[0], tokens))[0]
        finally:
            for lease in leases:
                lease.release()

    async def save_held(self, b: BackendSaves, conversation: Conversation, tokens: int) -> tuple[str, float]:
        """Save the slot as `conversation`'s now, the caller holding every slot (a park); result, seconds."""
        if b.saving:
            return "skipped", 0.0
        b.saving = True
        t0 = time.monotonic()
        try:
            result = await self._save(b, conversation.key, tokens, conversation.prefix[:PREFIX_BLOCKS])
        finally:
            b.saving = False
        took = time.monotonic() - t0
        self.metrics.kv_saves.labels(b.backend.name, result).inc()
        if result == "saved":
            self.metrics.kv_save_seconds.labels(b.backend.name).observe(took)
        return result, took

    async def _save(self, b: BackendSaves, key: str, tokens: int, prefix: list[str] | None = None) -> str:
        name = b.backend.name
        server = await self._server_id(b)
        if server is None:
            return "failed"
        filename = f"{key}-{int(time.time() * 1000)}.bin"
        try:
            b.folder.mkdir(parents=True, exist_ok=True)
            answer = await self._slot_action(b, "save", filename, SAVE_TIMEOUT)
        except (GatewayError, OSError, TimeoutError) as e:
            log.warning("backend %s: KV save failed (%s); it goes on serving", name, _why(e))
            _remove(b.folder / filename)
            return "failed"
        path = b.folder / filename
        try:
            size = path.stat().st_size
            n_saved = int(answer.get("n_saved") or 0)
            meta = {"key": key, "file": filename, "bytes": size, "n_tokens": n_saved, "time": time.time(),
                    "model": server.model, "n_ctx": server.n_ctx, "build": server.build, "slot": SLOT,
                    "prefix": prefix or []}
            old = _read_meta(b.folder / f"{key}.json")
            _write_atomic(b.folder / f"{key}.json", json.dumps(meta))
        except (OSError, ValueError, TypeError) as e:
            log.warning("backend %s: KV save of %s not kept (%s)", name, filename, _why(e))
            _remove(path)
            return "failed"
        if old and old.get("file") != filename:
            _remove(b.folder / str(old.get("file")))
        b.saved[key] = tokens
        took = answer.get("timings", {}).get("save_ms") if isinstance(answer.get("timings"), dict) else None
        log.info("backend %s: saved %d tokens of conversation %s (%s bytes%s)", name, n_saved, key[:8],
                 f"{size:,}", f", {took:.0f} ms" if isinstance(took, (int, float)) else "")
        self.metrics.kv_saved_bytes.labels(name).inc(size)
        self._bound(b)
        return "saved"

    def _bound(self, b: BackendSaves) -> None:
        """Keep the folder under its byte budget: oldest saves dropped first, the newest always kept;
        files no save names (a save cut off by a crash) dropped at once."""
        saves = sorted(_saves(b.folder), key=lambda m: m.get("time", 0), reverse=True)
        named = {m.get("file") for m in saves}
        for f in b.folder.glob("*.bin"):
            if f.name not in named:
                _remove(f)
        total = 0
        for i, m in enumerate(saves):
            total += int(m.get("bytes") or 0)
            if i > 0 and total > b.backend.kv_save_max_bytes:
                log.info("backend %s: dropped the KV save of conversation %s (kv_save_max_bytes = %d)",
                         b.backend.name, str(m.get("key"))[:8], b.backend.kv_save_max_bytes)
                _remove(b.folder / str(m.get("file")))
                _remove(b.folder / f"{m.get('key')}.json")
                b.saved.pop(str(m.get("key")), None)
                total -= int(m.get("bytes") or 0)
        self.metrics.kv_disk_bytes.labels(b.backend.name).set(total)

    # ---- restoring -------------------------------------------------------------------------

    async def restore(self, b: BackendSaves) -> dict[str, Any] | None:
        """Before the backend's queue reopens: restore the save that fits into its empty slot.
        What happened (for /health and `orchestrator status`), or None when nothing was to do."""
        backend = b.backend.name
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT):
                result, note = await self._restore(b)
        except TimeoutError:
            result, note = "failed", {"error": f"no answer in {RESTORE_TIMEOUT:g}s"}
            log.warning("backend %s: KV restore took over %gs; it starts cold", backend, RESTORE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a restore must never keep a backend from serving
            result, note = "failed", {"error": _why(e)}
            log.warning("backend %s: KV restore failed (%s); it starts cold", backend, _why(e))
        took = time.monotonic() - t0
        self.metrics.kv_restores.labels(backend, result).inc()
        if result == "warm":
            return None
        if result == "restored":
            self.metrics.kv_restore_seconds.labels(backend).observe(took)
            self.metrics.kv_restored_tokens.labels(backend).inc(note.get("n_tokens", 0))
        return {"result": result, "time": time.time(), "seconds": round(took, 3), **note}

    async def _restore(self, b: BackendSaves) -> tuple[str, dict[str, Any]]:
        name = b.backend.name
        if await self.slot_tokens(b) > 0:
            return "warm", {}  # its cache survived (the gateway restarted, not the server)
        saves = [m for m in _saves(b.folder) if m.get("slot", SLOT) == SLOT]
        if not saves:
            return "none", {}
        server = await self._server_id(b)
        if server is None:
            return "failed", {"error": "no /props"}
        fitting = [m for m in saves if not server.mismatch(m)]
        if not fitting:
            newest = max(saves, key=lambda m: m.get("time", 0))
            why = server.mismatch(newest)
            log.warning("backend %s: KV save refused, written by another server: %s; it starts cold", name, why)
            return "refused", {"error": why}
        first = b.waiting[min(b.waiting)] if b.waiting else None
        pick = for_waiter(fitting, first.key, first.prefix) if first else max(fitting, key=lambda m: m["time"])
        if pick is None:
            return "none", {}
        result, note = await self._restore_file(b, pick)
        if result == "restored":
            b.saved[str(pick["key"])] = -1  # the slot holds it again; the next finished turn saves anew
            b.holder, b.holder_whole = str(pick["key"]), False
        return result, note

    async def restore_key(self, b: BackendSaves, key: str) -> tuple[str, dict[str, Any]]:
        """Restore `key`'s save now, the caller holding the slot (an unpark); "none": no save of it fits."""
        server = await self._server_id(b)
        meta = _read_meta(b.folder / f"{key}.json")
        if server is None or meta is None or meta.get("slot", SLOT) != SLOT or server.mismatch(meta):
            return "none", {}
        return await self._restore_file(b, meta)

    async def _restore_file(self, b: BackendSaves, pick: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Restore one save. A failed one leaves the slot empty (llama-server clears it): cold, not wrong."""
        name = b.backend.name
        path = b.folder / str(pick.get("file"))
        size = path.stat().st_size if path.exists() else -1
        if size != pick.get("bytes"):
            log.warning("backend %s: KV save %s is %s (expected %s bytes); it starts cold", name, path.name,
                        "missing" if size < 0 else f"{size} bytes", pick.get("bytes"))
            return "failed", {"error": "save file missing or truncated"}
        try:
            answer = await self._slot_action(b, "restore", path.name, RESTORE_TIMEOUT)
        except GatewayError as e:
            log.warning("backend %s: KV restore of %s failed (%s); it starts cold", name, path.name, _why(e))
            return "failed", {"error": _why(e)}
        n = int(answer.get("n_restored") or 0)
        log.info("backend %s: restored %d tokens of conversation %s", name, n, str(pick["key"])[:8])
        return "restored", {"n_tokens": n, "key": pick["key"]}

    # ---- llama-server ----------------------------------------------------------------------

    async def _slot_action(self, b: BackendSaves, action: str, filename: str, timeout: float) -> dict[str, Any]:
        """POST /slots/0?action=...; its JSON answer, or a GatewayError saying why not."""
        data = json.dumps({"filename": filename}).encode()
        async with self.upstream.post(b.backend, f"/slots/{SLOT}?action={action}", data,
                                      {"Content-Type": "application/json"}, timeout=timeout) as resp:
            raw = await read_whole(resp, MAX_ACTION_ANSWER_BYTES, b.backend)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if resp.status != 200 or not isinstance(answer, dict):
            message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
            raise GatewayError(f"HTTP {resp.status}: {message or raw[:200]!r}")
        return answer

    async def _server_id(self, b: BackendSaves) -> ServerId | None:
        try:
            status, props = await self.upstream.get_json(b.backend, "/props", timeout=PROPS_TIMEOUT)
        except GatewayError as e:
            log.warning("backend %s: /props unreadable (%s)", b.backend.name, e.message)
            return None
        if status != 200 or not isinstance(props, dict):
            return None
        settings = props.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        return ServerId(str(props.get("model_path", "")), n_ctx if isinstance(n_ctx, int) else 0,
                        str(props.get("build_info", "")))

    async def slot_tokens(self, b: BackendSaves) -> int:
        """Tokens the slot holds now (0 when empty or unknown): a warm slot is not overwritten."""
        try:
            status, slots = await self.upstream.get_json(b.backend, "/slots", timeout=PROPS_TIMEOUT)
        except GatewayError:
            return 0
        if status != 200 or not isinstance(slots, list):
            return 0
        for s in slots:
            if isinstance(s, dict) and s.get("id") == SLOT and isinstance(s.get("n_prompt_tokens"), int):
                return s["n_prompt_tokens"]
        return 0


# ---- the folder ----------------------------------------------------------------------------

def _saves(folder: Path) -> Iterator[dict[str, Any]]:
    """Every readable save's metadata; an unreadable one is skipped (its file goes with the bound)."""
    try:
        metas = list(folder.glob("*.json"))
    except OSError:
        return
    for p in metas:
        meta = _read_meta(p)
        if meta is not None:
            yield meta
        else:
            log.warning("KV save metadata %s is unreadable; ignored", p)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and isinstance(meta.get("file"), str) and isinstance(meta.get("key"), str)
          and isinstance(meta.get("time"), (int, float)) and isinstance(meta.get("bytes"), int))
    return meta if ok else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _why(e: BaseException) -> str:
    return getattr(e, "message", None) or f"{e.__class__.__name__}: {e}"
