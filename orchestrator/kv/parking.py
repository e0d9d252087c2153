"""Parking's state: what a one-slot backend's slot was last given, and the paces measured there.

One `Parking` per backend whose slot is saved, held on the gateway's record of the backend. It is
the one writer of its fields: the act (request/parking.py: park, checkpoint and unpark before a
send) and the restart's restore (backends/gateway.py) tell it what happened through its methods,
and it answers the pure questions parking asks (does a checkpoint pay, is a save too slow, how
long may the slot wait for its conversation).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A turn computing fewer prompt tokens says more of a request's fixed cost (its template, its
# tokenizing, its first token) than of the prefill's pace.
PACE_MIN_TOKENS = 256
# After this many parks skipped in a row as dearer than a prefill, one runs anyway: a save pace measured
# on a small save (its fixed cost spread on few tokens) must not switch parking off for good.
PARK_RETRY_AFTER = 8


class SlotFound(enum.StrEnum):
    """What a granted request found in its one-slot backend's slot, once parking had done its work
    (cachemiss.py tells a switch or an unpark from an eviction by it)."""

    SAME = "same"          # its own conversation, still there
    SWITCHED = "switched"  # another conversation's, and no save of its own was restored
    UNPARKED = "unparked"  # its own, restored from its save
    EMPTY = "empty"        # nothing (a restart, a failed restore, a first request)
    UNKNOWN = "unknown"    # not a one-slot backend whose slot is saved: nobody follows it


@dataclass
class Parking:
    """One backend's parking state. Written only by its methods."""

    # The conversation the slot was last given; only once it ended whole is it the store's `latest`.
    holder: str | None = None
    holder_whole: bool = False
    save_pace: float = 0.0     # seconds per token of the last save: what a park would hold the slot
    prefill_pace: float = 0.0  # seconds per computed prompt token, last measured
    parks_skipped: int = 0     # parks skipped in a row as dearer than a prefill
    restored: str | None = None  # put back by the restart's restore (/slots then shows no tokens)

    # ---- what it is told -------------------------------------------------------------------

    def given(self, key: str) -> None:
        """The slot is given to conversation `key`'s request, whatever it held before."""
        self.holder, self.holder_whole, self.restored = key, False, None

    def ended_whole(self, key: str) -> None:
        """A request of `key` ended whole: the slot holds its prompt and answer."""
        if self.holder == key:
            self.holder_whole = True

    def prefill_measured(self, seconds: float, tokens: int) -> None:
        """A streamed turn computed `tokens` prompt tokens in `seconds` (to its first content)."""
        if tokens >= PACE_MIN_TOKENS:
            self.prefill_pace = max(0.0, seconds) / tokens

    def save_measured(self, seconds: float, tokens: int) -> None:
        """A save of `tokens` tokens held the slot `seconds`."""
        self.save_pace = seconds / tokens

    def restarted(self, restored: str | None) -> None:
        """The server restarted, and its restore put conversation `restored`'s save in the slot (None:
        nothing; whatever an earlier restore put there is gone)."""
        # What it held before is gone: a park now would save the empty slot (or the identity probe's
        # prompt, engines/fingerprint.py) under that conversation's name, over its good save.
        self.restored = restored
        self.holder, self.holder_whole = restored, False

    # ---- what it decides -------------------------------------------------------------------

    def found(self, key: str) -> SlotFound:
        """What the slot holds for `key`, as far as what it was last given says."""
        if self.holder is None:
            return SlotFound.EMPTY
        return SlotFound.SAME if self.holder == key else SlotFound.SWITCHED

    def checkpoint_pays(self, share: float, unsaved: int, tokens: int) -> bool:
        """Whether to save a busy conversation before its next turn: the tokens not on disk would cost
        more to compute again after a crash than saving it all costs now (both paces measured on this
        backend), or they pass `share` of it (the bound on what a crash can lose, and the rule until
        both paces are measured)."""
        if unsaved > share * tokens:
            return True
        return self.prefill_pace > 0 and self.save_pace > 0 and unsaved * self.prefill_pace > tokens * self.save_pace

    def save_too_slow(self, park: bool, tokens: int, max_seconds: float) -> bool:
        """Whether to skip a save of `tokens` (a park, or a checkpoint): it would hold the waiting request
        over `max_seconds`, or (a park) longer than computing the conversation again would take it
        later, both at the paces measured. A park skipped as dearer is counted: after PARK_RETRY_AFTER
        in a row, one runs to measure the save's pace again."""
        expected = self.save_pace * tokens
        dearer = park and expected > self.prefill_pace * tokens > 0
        if expected > max_seconds or (dearer and self.parks_skipped < PARK_RETRY_AFTER):
            self.parks_skipped += dearer
            return True
        self.parks_skipped = 0
        return False

    def keep_seconds(self, tokens: int, cap: float) -> float:
        """How long the slot may wait for its conversation's next turn while others wait: a save and a
        later restore of its `tokens` at the last save's measured pace (a restore is faster: an upper
        bound), at most `cap`; without a measured pace, the cap."""
        return min(cap, 2 * self.save_pace * tokens) if self.save_pace > 0 else cap
