"""KV persistence: a backend's slot saved to disk when idle, restored before its queue reopens.

A crashed or stopped llama-server comes back with an empty prompt cache, and the
next turn would re-process the whole conversation (minutes on a big model). So
once a main request has finished and the slot has been idle for a moment with
nobody waiting, the slot is saved (`POST /slots/0?action=save`) while the
gateway holds every slot of the backend, so no generation overlaps the save.
When the backend comes back, `health` awaits `restore` before it reopens the
queue: the save of the first waiting request's conversation, else the one sharing
its longest prefix (conversation.for_waiter), else none. Parking (request/parking.py) uses the
same store in a granted request's slot: `save_held` and `restore_key`. What each comes to is an
enum or a small record (results.py).

Each save is a pair in the backend's folder: `KEY-MS.bin`, llama-server's own
file, and `KEY.json`, what identifies the server that wrote it (its engine's server_id:
model file, context size, build, KV-changing options) and what the file must
be (its size and SHA-256, checked before a restore). The pair is keyed by the
conversation's prefix, so each conversation keeps its newest save. Nothing here
ever raises into its caller: a missing, foreign or corrupt save, a full disk or
a failed request is one warning line and a count, and the backend goes on cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..config import Config
from ..conversation import Conversation, for_waiter
from ..engines.base import Engine, ServerId
from ..engines.llama_server import SLOT, slot_dir
from ..errors import GatewayError
from ..metrics import Metrics
from ..slots import Lease, SlotQueue
from .backend_saves import BackendSaves
from .folder import SaveFolder, file_size, read_all, read_meta, remove, remove_all, write_atomic
from .results import HeldSave, Restore, RestoreResult, SaveResult
from .server_id import checksum

log = logging.getLogger(__name__)

# Writing or reading gigabytes takes seconds; a server that takes longer is stuck,
# and the backend must not stay closed because of it.
SAVE_TIMEOUT = 120.0
RESTORE_TIMEOUT = 120.0


class _Written(NamedTuple):
    """A slot the server has written to a file, not yet checksummed and named in its metadata."""

    filename: str
    answer: dict[str, Any]
    server: ServerId
    started: float


# A save keeps its conversation's first block hashes: a waiter without a save of its own gets the
# save sharing its longest prefix (conversation.for_waiter).
PREFIX_BLOCKS = 256


class KvPersistence:
    """The saves of every backend that has them: each backend's state is a `BackendSaves`,
    kept on the gateway's record of that backend and passed in."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self._var = Path(config.supervisor.log_dir).parent if config.supervisor.log_dir else None
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0

    def attach(self, engine: Engine, queue: SlotQueue) -> BackendSaves | None:
        """The saving state of a main backend whose slot is saved, or None (nothing saved there)."""
        backend = engine.backend
        if backend.role != "main" or not engine.saves_slots() or (not backend.kv_save_dir and self._var is None):
            return None  # supervised, but run by hand without `up`: no folder known
        self.metrics.add_kv_backend(backend.name)
        index = SaveFolder(slot_dir(self._var or Path("."), backend), backend.kv_save_max_bytes,
                           backend.kv_save_max_files, backend.kv_save_min_free_bytes)
        return BackendSaves(backend, queue, index, engine)

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
        if not b.watch.off:  # a save its restore cannot bring back is not made
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

    async def save(self, b: BackendSaves) -> SaveResult:
        """Save the slot now if it is idle and changed since its last save; the result, as counted."""
        if b.latest is None or b.saving:
            return SaveResult.SKIPPED
        backend = b.backend.name
        conversation, tokens = b.latest
        if b.saved.get(conversation.key) == tokens:
            self.metrics.kv_saves.labels(backend, SaveResult.UNCHANGED.value).inc()
            return SaveResult.UNCHANGED
        leases = self._idle_leases(b)
        if leases is None:
            self.metrics.kv_saves.labels(backend, SaveResult.BUSY.value).inc()
            return SaveResult.BUSY  # the request that holds it saves when it finishes
        try:
            written = await self._write(b, conversation, tokens)
        finally:
            for lease in leases:
                lease.release()
        if isinstance(written, SaveResult):
            return written
        return await self._finish(b, conversation, tokens, written)

    async def save_held(self, b: BackendSaves, conversation: Conversation, tokens: int) -> HeldSave:
        """Save the slot as `conversation`'s now, the caller holding every slot (a park or a checkpoint).
        Returns once the server has written the file: the result and the seconds that took. The
        checksum and the metadata follow in the background with the slot in use again."""
        # No check of `saving`: the caller's slot keeps any other slot write out; an earlier save's
        # checksum may still be under way, and this conversation must not go unsaved for it.
        t0 = time.monotonic()
        written = await self._write(b, conversation, tokens)
        took = time.monotonic() - t0
        if isinstance(written, SaveResult):
            return HeldSave(written, took)
        # Counted as saved from now, so the next turn does not checkpoint it again while its checksum
        # runs; undone if its metadata cannot be written.
        key, before = conversation.key, b.saved.get(conversation.key, 0)
        b.saved[key] = tokens
        undo = functools.partial(b.saved.__setitem__, key, before)
        self._spawn(self._finish(b, conversation, tokens, written, undo), f"kv-keep:{b.backend.name}")
        return HeldSave(SaveResult.SAVED, took)

    async def _write(self, b: BackendSaves, conversation: Conversation, tokens: int) -> _Written | SaveResult:
        """The server writes the slot to a file, counted in `saving` from here until `_finish` ends;
        else why not (FAILED, NO_ROOM), counted."""
        b.saving += 1
        written: _Written | SaveResult = SaveResult.FAILED
        try:
            written = await self._save(b, conversation.key, tokens)
        finally:
            if isinstance(written, SaveResult):
                b.saving -= 1
                self.metrics.kv_saves.labels(b.backend.name, written.value).inc()
        return written

    async def _finish(self, b: BackendSaves, conversation: Conversation, tokens: int, written: _Written,
                      undo: Callable[[], None] | None = None) -> SaveResult:
        """Checksum and metadata of a written save, taken with the slot free again (seconds for
        gigabytes: a request arriving now is not kept waiting by it), one save at a time in the order
        written, so the newest save of a conversation is the one its metadata names."""
        backend = b.backend.name
        generation = b.generation
        try:
            async with b.keeping:
                result = await self._keep(b, conversation, tokens, written)
        finally:
            b.pending.discard(written.filename)
            b.saving -= 1
        if result is not SaveResult.SAVED and undo is not None:
            undo()
        self.metrics.kv_saves.labels(backend, result.value).inc()
        if result is SaveResult.SAVED:
            self.metrics.kv_save_seconds.labels(backend).observe(time.monotonic() - written.started)
        if b.generation != generation:
            # A request finished meanwhile, and its own save found this one running.
            self._spawn(self._save_when_idle(b, b.generation), f"kv-save:{backend}")
        return result

    async def _save(self, b: BackendSaves, key: str, tokens: int) -> _Written | SaveResult:
        """The slot written to a new file by the server, once the folder has room for it (folder.py)."""
        name = b.backend.name
        server = await b.engine.server_id()
        if server is None:
            log.warning("backend %s: /props unreadable; no KV save", name)
            return SaveResult.FAILED
        await b.index.ready(b.pending)
        expected = b.index.expected(tokens)
        if not await self._make_room(b, key, expected, "to make room"):
            return SaveResult.NO_ROOM
        started = time.monotonic()
        filename = f"{key}-{int(time.time() * 1000)}.bin"
        # Pending from before the server writes it: the file is on disk before its answer comes, and
        # a start-up scan meanwhile would sweep it as named by no save.
        b.pending.add(filename)
        answer = None
        try:
            await asyncio.to_thread(b.folder.mkdir, parents=True, exist_ok=True)
            answer = await b.engine.save_slot(filename, SAVE_TIMEOUT)
        except (GatewayError, OSError, TimeoutError) as e:
            log.warning("backend %s: KV save failed (%s); it goes on serving", name, _why(e))
            cut = await asyncio.to_thread(file_size, b.folder / filename)  # what was written: a lower bound
            b.index.failed(cut, tokens)
            await asyncio.to_thread(remove, b.folder / filename)
            # A full disk is the likely cause when the space left is short of a save: older ones go.
            await self._make_room(b, key, max(expected, b.index.largest, cut), "after a failed save")
        finally:
            if answer is None:  # failed or cancelled: a file left behind is the next scan's to sweep
                b.pending.discard(filename)
        return _Written(filename, answer, server, started) if answer is not None else SaveResult.FAILED

    async def _make_room(self, b: BackendSaves, key: str, expected: int, why: str) -> bool:
        """The least recently used saves dropped for one of `expected` bytes to fit (folder.py); False
        when even all of them would not do."""
        dropped = await b.index.make_room(key, expected, b.keys_pending())
        if dropped is None:
            log.warning("backend %s: KV save not made: %s; the next turn after a restart is cold",
                        b.backend.name, b.index.problem)
            return False
        self._dropped(b, dropped, why)
        return True

    def _dropped(self, b: BackendSaves, keys: list[str], why: str) -> None:
        for key in keys:
            b.saved.pop(key, None)
        if keys:  # one line however many (a lowered kv_save_max_files drops thousands at once)
            log.info("backend %s: dropped the KV saves of %d conversations (%s): %s%s", b.backend.name, len(keys),
                     why, ", ".join(k[:8] for k in keys[:5]), " ..." if len(keys) > 5 else "")
        self.metrics.kv_disk_bytes.labels(b.backend.name).set(b.index.total)

    async def _keep(self, b: BackendSaves, conversation: Conversation, tokens: int,
                    written: _Written) -> SaveResult:
        """The save's metadata written beside it (its checksum, its server), the folder bounded."""
        name, key = b.backend.name, conversation.key
        filename, answer, server = written.filename, written.answer, written.server
        path = b.folder / filename
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
            t0 = time.monotonic()
            digest = await asyncio.to_thread(checksum, path)
            hashed = time.monotonic() - t0
            n_saved = int(answer.get("n_saved") or 0)
            meta = {"key": key, "file": filename, "bytes": size, "sha256": digest, "n_tokens": n_saved,
                    "time": time.time(), **server.fields(), "slot": SLOT,
                    "prefix": conversation.prefix[:PREFIX_BLOCKS]}
            await asyncio.to_thread(write_atomic, b.folder / f"{key}.json", json.dumps(meta))
        except (OSError, ValueError, TypeError) as e:
            log.warning("backend %s: KV save of %s not kept (%s)", name, filename, _why(e))
            await asyncio.to_thread(remove, path)
            return SaveResult.FAILED
        replaced = b.index.kept(meta)
        if replaced is not None:
            await asyncio.to_thread(remove, b.folder / replaced)
        b.saved[key] = tokens
        b.index.problem = ""
        took = answer.get("timings", {}).get("save_ms") if isinstance(answer.get("timings"), dict) else None
        log.info("backend %s: saved %d tokens of conversation %s (%s bytes%s, checksum %.0f ms)", name, n_saved,
                 key[:8], f"{size:,}", f", {took:.0f} ms" if isinstance(took, (int, float)) else "", hashed * 1000)
        self.metrics.kv_saved_bytes.labels(name).inc(size)
        budget = b.backend.kv_save_max_bytes, b.backend.kv_save_max_files
        dropped = b.index.over_budget(key, b.keys_pending())
        await b.index.drop(dropped)
        self._dropped(b, dropped, "kv_save_max_bytes {}, kv_save_max_files {}".format(*budget))
        return SaveResult.SAVED

    # ---- restoring -------------------------------------------------------------------------

    async def restore(self, b: BackendSaves) -> Restore:
        """Before the backend's queue reopens: restore the save that fits into its empty slot. What
        happened, timed (its `view` is what /health and `orchestrator status` show)."""
        backend = b.backend.name
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT):
                done = await self._restore(b)
        except TimeoutError:
            done = Restore(RestoreResult.FAILED, error=f"no answer in {RESTORE_TIMEOUT:g}s")
            log.warning("backend %s: KV restore took over %gs; it starts cold", backend, RESTORE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a restore must never keep a backend from serving
            done = Restore(RestoreResult.FAILED, error=_why(e))
            log.warning("backend %s: KV restore failed (%s); it starts cold", backend, _why(e))
        took = time.monotonic() - t0
        self.metrics.kv_restores.labels(backend, done.result.value).inc()
        if done.result is RestoreResult.RESTORED:
            self.metrics.kv_restore_seconds.labels(backend).observe(took)
            self.metrics.kv_restored_tokens.labels(backend).inc(done.tokens)
        return dataclasses.replace(done, seconds=took, at=time.time())

    async def _restore(self, b: BackendSaves) -> Restore:
        name = b.backend.name
        if b.watch.off:
            return Restore(RestoreResult.NONE, error=f"restores off: {b.watch.off}")
        warm = await self.slot_tokens(b) > 0
        await b.engine.identify(warm)  # before any restore into it, and before its next save
        if warm:
            return Restore(RestoreResult.WARM)  # its cache survived (the gateway restarted, not the server)
        b.saved.clear()  # a new server: what was saved for another one counts as unsaved until it fits
        await b.index.ready(b.pending)
        if not len(b.index):
            return Restore(RestoreResult.NONE)
        server = await b.engine.server_id()
        if server is None:
            return Restore(RestoreResult.FAILED, error="no /props")
        first = b.waiting[min(b.waiting)] if b.waiting else None
        if first is not None and b.index.get(first.key) is not None:  # the first waiter's own: one file read
            own = await asyncio.to_thread(read_meta, b.folder / f"{first.key}.json")
            if own is not None and own.get("slot", SLOT) == SLOT and not server.mismatch(own):
                return await self._restore_file(b, own)
        metas = await asyncio.to_thread(read_all, b.folder, b.index.keys())
        saves = [m for m in metas if m.get("slot", SLOT) == SLOT]
        if not saves:
            return Restore(RestoreResult.NONE)
        fitting = [m for m in saves if not server.mismatch(m)]
        if not fitting:
            newest = max(saves, key=lambda m: m.get("time", 0))
            why = server.mismatch(newest)
            log.warning("backend %s: KV save refused, written by another server: %s; it starts cold", name, why)
            return Restore(RestoreResult.REFUSED, error=why)
        pick = for_waiter(fitting, first.key, first.prefix) if first else max(fitting, key=lambda m: m["time"])
        if pick is None:
            return Restore(RestoreResult.NONE)
        return await self._restore_file(b, pick)

    async def restore_key(self, b: BackendSaves, key: str) -> Restore:
        """Restore `key`'s save now, the caller holding the slot (an unpark); NONE: no save of it fits."""
        if any(name.startswith(f"{key}-") for name in b.pending):
            # Its park was just written and its checksum is under way (in order, behind the lock):
            # waiting for it costs far less than the prefill going cold would.
            async with b.keeping:
                pass
        server = await b.engine.server_id()
        meta = await asyncio.to_thread(read_meta, b.folder / f"{key}.json")
        if server is None or meta is None or meta.get("slot", SLOT) != SLOT or server.mismatch(meta):
            return Restore(RestoreResult.NONE)
        return await self._restore_file(b, meta)

    async def _restore_file(self, b: BackendSaves, pick: dict[str, Any]) -> Restore:
        """Restore one save. A failed one leaves the slot empty (llama-server clears it): cold, not wrong.
        A restored one counts as saved with what its file holds: no checkpoint of all of it again at once."""
        name = b.backend.name
        path = b.folder / str(pick.get("file"))
        size = await asyncio.to_thread(file_size, path)
        if size != pick.get("bytes"):
            log.warning("backend %s: KV save %s is %s (expected %s bytes); it starts cold", name, path.name,
                        "missing" if size < 0 else f"{size} bytes", pick.get("bytes"))
            return Restore(RestoreResult.FAILED, error="save file missing or truncated")
        digest = await asyncio.to_thread(checksum, path)
        if digest != pick.get("sha256"):
            log.warning("backend %s: KV save %s does not match its checksum (damaged on disk, or written "
                        "without one); removed, it starts cold", name, path.name)
            await b.index.drop([str(pick["key"])])
            await asyncio.to_thread(remove_all, [path, b.folder / f"{pick['key']}.json"])
            self._dropped(b, [str(pick["key"])], "damaged")
            return Restore(RestoreResult.FAILED, error="save file does not match its checksum")
        try:
            answer = await b.engine.restore_slot(path.name, RESTORE_TIMEOUT)
        except GatewayError as e:
            log.warning("backend %s: KV restore of %s failed (%s); it starts cold", name, path.name, _why(e))
            return Restore(RestoreResult.FAILED, error=_why(e))
        n, key = int(answer.get("n_restored") or 0), str(pick["key"])
        log.info("backend %s: restored %d tokens of conversation %s", name, n, key[:8])
        b.saved[key] = n
        b.index.used(key, time.time())
        return Restore(RestoreResult.RESTORED, tokens=n, key=key)

    # ---- the engine ------------------------------------------------------------------------

    async def slot_tokens(self, b: BackendSaves) -> int:
        """Tokens the slot holds now (0 when empty or unknown): a warm slot is not overwritten."""
        return await b.engine.slot_tokens()


def _why(e: BaseException) -> str:
    return getattr(e, "message", None) or f"{e.__class__.__name__}: {e}"
