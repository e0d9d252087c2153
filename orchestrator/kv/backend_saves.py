"""One backend's saving state: what the store (store.py) knows of that backend's slot and saves.

It lives on the gateway's record of the backend (backends/gateway.py) and is written by the store
and by parking's act (request/parking.py) through the store; its folder and what the folder holds
are its `SaveFolder`'s (folder.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from ..config import BackendConfig
from ..conversation import Conversation
from ..engines.base import Engine
from ..slots import SlotQueue
from .folder import SaveFolder
from .restorable import RestoreWatch


@dataclass
class BackendSaves:
    """One backend's saving state and folder."""

    backend: BackendConfig
    queue: SlotQueue
    index: SaveFolder  # the folder and what it holds (folder.py): its one owner
    engine: Engine  # what saves and restores the slot (engines/)
    latest: tuple[Conversation, int] | None = None  # the last finished request's conversation, tokens
    saved: dict[str, int] = field(default_factory=dict)  # conversation key -> tokens at its last save
    generation: int = 0                          # bumped by every finished request
    waiting: dict[int, Conversation] = field(default_factory=dict)  # waiting requests, first come first
    saving: int = 0  # saves under way, from the slot's write to their metadata: the idle save waits
    pending: set[str] = field(default_factory=set)  # files written, their metadata not yet: kept by a start-up scan
    keeping: asyncio.Lock = field(default_factory=asyncio.Lock)  # one save's metadata at a time, in order
    watch: RestoreWatch = field(default_factory=RestoreWatch)  # whether its saves can pay off (restorable.py)

    @property
    def folder(self) -> Path:
        return self.index.path

    def tokens_saved(self, key: str) -> int:
        """Tokens of conversation `key` on disk at its last save (0: none)."""
        return max(self.saved.get(key, 0), 0)

    def keys_pending(self) -> frozenset[str]:
        """Keys with a save written and its metadata not yet: never dropped under their keep."""
        return frozenset(name.split("-", 1)[0] for name in self.pending)
