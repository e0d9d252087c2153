"""What the save store's work comes to: a save's and a restore's result, as enums and small records.

The enums' values are the `result` labels of `orchestrator_kv_saves_total` and
`orchestrator_kv_restores_total`, and the `result` /health shows of a restore: the dashboard and
`orchestrator status` read them, so they do not change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class SaveResult(enum.StrEnum):
    SAVED = "saved"
    FAILED = "failed"
    NO_ROOM = "no_room"      # the disk or the budget has no room for it, even with every older save dropped
    BUSY = "busy"            # a slot was in use or a request waited: the request saves when it finishes
    UNCHANGED = "unchanged"  # its conversation's save holds as many tokens already
    SKIPPED = "skipped"      # nothing to save, or a save under way (not counted)


class RestoreResult(enum.StrEnum):
    RESTORED = "restored"
    WARM = "warm"        # the slot held tokens: its cache survived, nothing overwritten
    NONE = "none"        # no save, or none that fits
    REFUSED = "refused"  # every save was written by another server (model, context, build)
    FAILED = "failed"


@dataclass(frozen=True)
class HeldSave:
    """A save made in a slot the caller holds (a park or a checkpoint): its result, and the seconds the
    server took to write it (what the slot was held for)."""

    result: SaveResult
    seconds: float


@dataclass(frozen=True)
class Restore:
    """What a restore came to. A restored one names its conversation and the tokens put back; a failed
    or refused one says why."""

    result: RestoreResult
    tokens: int = 0
    key: str | None = None
    error: str | None = None
    seconds: float = 0.0                             # how long it took (the restart's restore)
    at: float = 0.0                                  # when it ended, wall clock

    def view(self) -> dict[str, Any] | None:
        """What /health and `orchestrator status` show of a restart's restore; None when the slot was
        warm (nothing was to do)."""
        if self.result is RestoreResult.WARM:
            return None
        view = {"result": self.result.value, "time": self.at, "seconds": round(self.seconds, 3)}
        if self.result is RestoreResult.RESTORED:
            return {**view, "n_tokens": self.tokens, "key": self.key}
        return {**view, "error": self.error} if self.error is not None else view

