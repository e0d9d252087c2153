"""Whether a backend's slot saves can pay off: what its model is (engines/model_cache.py), and what its
restores have read back.

One `RestoreWatch` per backend whose slot is saved, on its `BackendSaves`. Its verdict is the one
question the savers ask (`off`): parking, checkpoints, the idle save and the restart's restore all
skip a backend whose restores cannot bring the cache back, and every miss there says why
(cachemiss's `restore_ineffective`). Two ways to be off:

- the model says so: a sliding-window model without `--swa-full` (learned at start-up and after
  every restart, `learned`);
- the restores say so: the first turn after a restore read from cache far less than the restore put
  back (`after_restore`), OFF_AFTER times in a row. That one holds until the backend's model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engines.model_cache import ModelCache

# A first turn after a restore reading under this share of the restored prompt read back "less".
SHORT_BELOW = 0.5
# A restore of fewer tokens is not judged: on a short prompt, the few tokens a template or a
# tokenizer changes at its end weigh more than what the restore brought back.
SHORT_MIN_TOKENS = 256
# Restores turned off after this many short ones in a row.
OFF_AFTER = 3
# What still keeps a conversation's cache when its slot's saves cannot, for the user to lean on.
INSTEAD = "the prompt cache in RAM, --cache-ram; a conversation kept on its slot; affinity in a pool"


@dataclass
class RestoreWatch:
    model: ModelCache | None = None
    short_in_row: int = 0
    short_total: int = 0
    measured_off: str = ""   # why the restores turned themselves off ("" while on)

    def learned(self, model: ModelCache | None) -> None:
        """What the backend's model is, read at a (re)start (None: not known; the last one stays)."""
        if model is None:
            return
        if self.model is not None and self.model.model != model.model:
            self.short_in_row, self.measured_off = 0, ""  # another model: its restores are measured anew
        self.model = model

    @property
    def off(self) -> str:
        """Why saves cannot pay off on this backend; "" while they may."""
        if self.model is not None and self.model.restorable is False:
            return self.model.why
        return self.measured_off

    @staticmethod
    def short(restored: int, cached: int) -> bool:
        """Whether a first turn after a restore of `restored` tokens that read `cached` from cache read
        back less than the save held."""
        return restored >= SHORT_MIN_TOKENS and cached < SHORT_BELOW * restored

    def after_restore(self, short: bool, restored: int, cached: int) -> bool:
        """The first turn after a restore read `cached` of the `restored` tokens; True when this turns
        the restores off."""
        if not short:
            self.short_in_row = 0
            return False
        self.short_in_row += 1
        self.short_total += 1
        if self.short_in_row >= OFF_AFTER and not self.measured_off:
            self.measured_off = (f"{self.short_in_row} restores in a row read back less than they held "
                                 f"(last: {cached} of {restored} tokens from cache)")
            return True
        return False

    def view(self) -> dict[str, Any]:
        return {"on": not self.off, "off_because": self.off, "instead": INSTEAD if self.off else "",
                "short_in_row": self.short_in_row, "short_total": self.short_total}
