"""The KV save folder: its files, and the index of them the gateway keeps in memory.

Each save is `KEY-MS.bin` (llama-server's own file) and `KEY.json` (its metadata). Only names the
gateway writes are read or removed; metadata is written atomically, so a crash leaves the old pair
or the new one, never half of one.

`SaveFolder` is the one owner of what the folder holds. It reads the folder once, in a thread (the
first save or restore waits for that), and from then knows each save's size, tokens and last use
from what the store tells it: no request pays for a scan of the folder, however many saves it
holds (issue 28: reading 20,000 saves' metadata after each save stalled the loop for seconds).
Its bounds, checked before each save: the bytes (`kv_save_max_bytes`), the count
(`kv_save_max_files`), and the free space left on the disk (`kv_save_min_free_bytes`, by default
the smaller of 5% of the disk and 2 GiB). The least recently used saves make room, and when even
all of them cannot, the save is not made: a full disk costs a cold turn, never a failed request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The default free-space floor: the smaller of this share of the disk and this many bytes.
FLOOR_SHARE = 0.05
FLOOR_BYTES = 2 * 1024 ** 3

# A save's metadata, its prefix's block hashes the most of it, is a few kilobytes: the free space a
# save needs counts it too (the byte budget counts the saves' own files).
META_BYTES = 16 * 1024

# The only names the gateway writes: a conversation key (conversation.conversation_key, 32 hex digits)
# and its save file KEY-MILLISECONDS.bin. Metadata naming anything else ("../../x", an absolute
# path) was not written here, and is never followed: it could make the gateway delete any file.
_KEY = re.compile(r"[0-9a-f]{32}")
_FILE = re.compile(r"([0-9a-f]{32})-[0-9]{1,20}\.bin")


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    key, file, size = meta.get("key"), meta.get("file"), meta.get("bytes")
    ok = (isinstance(key, str) and _KEY.fullmatch(key) is not None and path.name == f"{key}.json"
          and isinstance(file, str) and (m := _FILE.fullmatch(file)) is not None and m.group(1) == key
          # A negative size would lift the byte budget; bool is an int to Python.
          and isinstance(size, int) and not isinstance(size, bool) and size >= 0
          and isinstance(meta.get("time"), (int, float)))
    return meta if ok else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


@dataclass
class Kept:
    """One save as the index knows it."""

    key: str
    file: str
    bytes: int
    tokens: int
    # When it was written, or restored since (this process): the least recently used go first.
    used: float

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Kept:
        tokens = meta.get("n_tokens")
        return cls(meta["key"], meta["file"], meta["bytes"], tokens if isinstance(tokens, int) else 0,
                   float(meta["time"]))


def scan(folder: Path, pending: set[str]) -> list[Kept]:
    """Every readable save in the folder, least recently used first; files no save names (a save cut
    off by a crash) removed, but for `pending` ones (written, their metadata not yet). Slow with
    many saves: run it in a thread."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        if name.endswith(".json"):
            meta = read_meta(folder / name)
            if meta is None:
                log.warning("KV save metadata %s is unreadable; ignored", folder / name)
            else:
                found.append(Kept.of(meta))
    named = {k.file for k in found}
    for name in names:
        if name.endswith(".bin") and name not in named and name not in pending:
            remove(folder / name)
    return sorted(found, key=lambda k: k.used)


def disk_space(folder: Path) -> tuple[int, int] | None:
    """(free bytes, disk size) of the disk holding `folder` (or its nearest existing parent)."""
    path = folder
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class SaveFolder:
    """One backend's save folder and its index (see the module's docstring)."""

    def __init__(self, path: Path, max_bytes: int, max_files: int, min_free: int) -> None:
        self.path = path
        self.max_bytes, self.max_files, self.min_free = max_bytes, max_files, min_free
        self._kept: collections.OrderedDict[str, Kept] = collections.OrderedDict()  # least recently used first
        self.total = 0  # bytes of the saves kept
        self.problem = ""  # why the last save could not be made, until one is
        self._failed_per_token = 0.0  # a failed save's bytes written per token: a lower bound, until one is kept
        self._loaded: asyncio.Task | None = None

    # ---- reading the folder, once ----
    async def ready(self, pending: set[str]) -> None:
        """The index read from disk (once; whoever comes first starts it, the rest wait for it). The
        task fills the index itself: a caller cancelled while it runs loses nothing."""
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._load(set(pending)))
        await asyncio.shield(self._loaded)

    async def _load(self, pending: set[str]) -> None:
        for kept in await asyncio.to_thread(scan, self.path, pending):
            self._put(kept)

    def _put(self, kept: Kept) -> None:
        old = self._kept.pop(kept.key, None)
        self.total += kept.bytes - (old.bytes if old else 0)
        self._kept[kept.key] = kept

    # ---- what it holds ----
    def __len__(self) -> int:
        return len(self._kept)

    def get(self, key: str) -> Kept | None:
        return self._kept.get(key)

    def keys(self) -> list[str]:
        """The saves' keys, most recently used first."""
        return list(reversed(self._kept))

    def bytes_per_token(self) -> float | None:
        """Of the most recent save that says (what the next one will cost on disk, per token), at least
        what a save that failed since had written."""
        for kept in reversed(self._kept.values()):
            if kept.tokens > 0:
                return max(kept.bytes / kept.tokens, self._failed_per_token)
        return self._failed_per_token or None

    @property
    def largest(self) -> int:
        """The largest save kept (a scan of the index: after a failed save only)."""
        return max((k.bytes for k in self._kept.values()), default=0)

    def expected(self, tokens: int) -> int:
        """About what a save of `tokens` tokens will take: by the bytes per token of the last one, but
        at most twice the largest of the 16 most recent (a hybrid model's save is mostly a fixed
        recurrent state: per token, a short save would promise a long one gigabytes), at least what a
        failed one wrote."""
        per_token = self.bytes_per_token()
        if not per_token:
            return 0
        linear = int(per_token * tokens)
        recent = [k.bytes for k in itertools.islice(reversed(self._kept.values()), 16)]
        cap = 2 * max(recent) if recent else linear
        return max(min(linear, cap), int(self._failed_per_token * tokens))

    def failed(self, written: int, tokens: int) -> None:
        """A save failed after writing `written` bytes of `tokens` (a full disk cuts it short)."""
        if written > 0 and tokens > 0:
            self._failed_per_token = max(self._failed_per_token, written / tokens)

    def disk(self) -> tuple[int, int] | None:
        """(free bytes, size) of its disk, now (a statvfs: microseconds)."""
        return disk_space(self.path)

    def view(self) -> dict[str, Any]:
        """What /health, the page and `orchestrator status` show of it."""
        disk = self.disk()
        return {"saves": len(self._kept), "bytes": self.total, "max_bytes": self.max_bytes,
                "max_files": self.max_files, "disk_free": disk[0] if disk else None,
                "min_free": self.floor(disk), "problem": self.problem or None,
                "budget": budget_problem(self.max_bytes, self.total, disk, self.floor(disk)) or None}

    def floor(self, disk: tuple[int, int] | None) -> int:
        """The free space a save must leave."""
        if self.min_free >= 0 or disk is None:
            return max(self.min_free, 0)
        return min(int(disk[1] * FLOOR_SHARE), FLOOR_BYTES)

    # ---- what the store tells it ----
    def kept(self, meta: dict[str, Any]) -> str | None:
        """A save's metadata was written: it is the newest of its key; the file of the one it replaced."""
        self._failed_per_token = 0.0
        old = self._kept.get(meta["key"])
        self._put(Kept.of(meta))
        return old.file if old is not None and old.file != meta["file"] else None

    def used(self, key: str, when: float) -> None:
        """A save was restored: the last to go."""
        kept = self._kept.get(key)
        if kept is not None:
            kept.used = when
            self._kept.move_to_end(key)

    def forget(self, key: str) -> list[Path]:
        """A save dropped from the index: its files, for the caller to remove."""
        kept = self._kept.pop(key, None)
        if kept is None:
            return []
        self.total -= kept.bytes
        return [self.path / kept.file, self.path / f"{key}.json"]

    def room_for(self, key: str, expected: int, disk: tuple[int, int] | None,
                 busy: frozenset[str] = frozenset()) -> list[str] | None:
        """The saves to drop (least recently used first; `key`'s own is replaced by the new one, so not
        among them) for a save of about `expected` bytes to fit every bound; None when even dropping
        all of them would not do (the disk is full of other things)."""
        own = self._kept.get(key)
        count = len(self._kept) + (own is None)
        total = self.total - (own.bytes if own else 0) + expected
        free = None if disk is None else disk[0] - expected - META_BYTES
        floor = self.floor(disk)
        drop: list[str] = []
        for k, kept in self._kept.items():
            if count <= self.max_files and total <= self.max_bytes and (free is None or free >= floor):
                break
            if k == key or k in busy:  # its own, or one whose newer save is being kept: not dropped
                continue
            drop.append(k)
            count, total = count - 1, total - kept.bytes
            free = None if free is None else free + kept.bytes
        fits = count <= max(self.max_files, 1) and (free is None or free >= floor)
        return drop if fits else None

    async def make_room(self, key: str, expected: int, busy: frozenset[str] = frozenset()) -> list[str] | None:
        """Drop what `room_for` says, now; the keys dropped, or None (and `problem` says why)."""
        disk = self.disk()
        drop = self.room_for(key, expected, disk, busy)
        if drop is None:
            free = f"{disk[0]:,} bytes free" if disk else "free space unknown"
            self.problem = (f"no room for a save of about {expected:,} bytes: {free}, {self.floor(disk):,} to "
                            f"be left free (kv_save_min_free_bytes)")
            return None
        await self.drop(drop)
        return drop

    async def drop(self, keys: list[str]) -> None:
        """These saves out of the index, their files removed in a thread."""
        paths = [p for key in keys for p in self.forget(key)]
        if paths:
            await asyncio.to_thread(remove_all, paths)

    def over_budget(self, keep: str, busy: frozenset[str] = frozenset()) -> list[str]:
        """The saves to drop, least recently used first, for the folder to be within its bytes and count
        (the newest, `keep`, always stays: a budget smaller than one save still keeps that one)."""
        count, total, drop = len(self._kept), self.total, []
        for k, kept in self._kept.items():
            if count <= self.max_files and total <= self.max_bytes:
                break
            if k != keep and k not in busy:
                drop.append(k)
                count, total = count - 1, total - kept.bytes
        return drop


def budget_problem(max_bytes: int, kept: int, disk: tuple[int, int] | None, floor: int) -> str:
    """What is wrong with a byte budget on this disk ('' when it fits): the saves could never reach it."""
    if disk is None:
        return ""
    room = disk[0] + kept - floor
    if max_bytes <= room:
        return ""
    return (f"kv_save_max_bytes ({max_bytes:,}) is more than this disk can give the saves ({max(room, 0):,} "
            f"bytes: {disk[0]:,} free, {floor:,} to be left free): the free space bounds them first")


def folder_line(folder: Path, max_bytes: int, min_free: int) -> str:
    """check-config's word on a backend's save folder: where, and whether its budget fits its disk."""
    disk = disk_space(folder)
    floor = SaveFolder(folder, max_bytes, 1, min_free).floor(disk)
    where = f"{folder} ({disk[0]:,} bytes free of {disk[1]:,})" if disk else f"{folder} (its disk not readable)"
    return f"{where}; " + (budget_problem(max_bytes, 0, disk, floor) or
                           f"kv_save_max_bytes ({max_bytes:,}) fits beside {floor:,} bytes left free")


def read_all(folder: Path, keys: list[str]) -> list[dict[str, Any]]:
    """The metadata of these saves, each readable one (slow with many: run it in a thread)."""
    return [m for m in (read_meta(folder / f"{k}.json") for k in keys) if m is not None]


def file_size(path: Path) -> int:
    """-1 when missing."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def remove_all(paths: list[Path]) -> None:
    """Unlink each (a multi-gigabyte file's unlink can take a while: run it in a thread)."""
    for p in paths:
        remove(p)
