"""The KV save folder, a store of files: each save is `KEY-MS.bin` (llama-server's own file) and
`KEY.json` (its metadata). Only names the gateway writes are read or removed; metadata is written
atomically, so a crash leaves the old pair or the new one, never half of one."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def saves(folder: Path) -> Iterator[dict[str, Any]]:
    """Every readable save's metadata; an unreadable one is skipped (its file goes with the bound)."""
    try:
        metas = list(folder.glob("*.json"))
    except OSError:
        return
    for p in metas:
        meta = read_meta(p)
        if meta is not None:
            yield meta
        else:
            log.warning("KV save metadata %s is unreadable; ignored", p)


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


def bound(folder: Path, max_bytes: int, pending: set[str]) -> tuple[int, list[str]]:
    """Keep the folder under `max_bytes`: oldest saves dropped first, the newest always kept; files no
    save names (a save cut off by a crash) dropped at once, but for `pending` ones (written, their
    metadata not yet). The bytes kept and the keys dropped."""
    found = sorted(saves(folder), key=lambda m: m.get("time", 0), reverse=True)
    named = {m.get("file") for m in found}
    for f in folder.glob("*.bin"):
        if f.name not in named and f.name not in pending:
            remove(f)
    total, dropped = 0, []
    for i, m in enumerate(found):
        total += int(m.get("bytes") or 0)
        if i > 0 and total > max_bytes:
            remove(folder / str(m.get("file")))
            remove(folder / f"{m.get('key')}.json")
            dropped.append(str(m.get("key")))
            total -= int(m.get("bytes") or 0)
    return total, dropped
