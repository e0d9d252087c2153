"""Why a turn's prompt was not read from cache: one classification per main or agent turn.

For each turn: prompt tokens read from cache (the answer's `cache_read_input_tokens`) and
computed, and why tokens beyond the new ones were computed:

- `new`: the conversation was not seen before (or was forgotten);
- `prefix_changed`: the forwarded prompt differs from the conversation's previous turn before that
  turn's end, at the block named (e.g. `system[1]`: a volatile line not normalised), so the server
  could reuse only up to there: token N is what it read from cache;
- `unparked`: its save was restored into the slot first (parking.py);
- `switched`: the slot held another conversation and it had no save to restore (a switch that the
  server's own prompt cache in RAM served, reading the previous turn's prompt, is a `hit`);
- `evicted`: same conversation, same prefix, slot not known to be replaced, but the server read
  under 90% of the previous turn's prompt (its host cache dropped it, or it restarted);
- `restore_ineffective`: a switch, an unpark or a restart cost the prompt, and a restore could not
  have saved it (its `why`: the backend's restores are off, restorable.py, e.g. a sliding-window
  model without --swa-full), or an unpark was made and its first turn read back under half the
  previous prompt (counted, restorable.RestoreWatch.after_restore);
- `hit`: the previous turn's prompt was read from cache.

Bounded: the block hashes of the last turn of at most MAX_CONVERSATIONS conversations (each at
most conversation.MAX_BLOCKS), and the last RECENT turns per backend for /health.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..conversation import kind
from ..metrics import Metrics
from .parking import SlotFound
from .restorable import RestoreWatch

log = logging.getLogger(__name__)

MAX_CONVERSATIONS = 512
RECENT = 20
# Reading less than this share of the previous turn's prompt means the cache lost it.
EVICTED_BELOW = 0.9
short = RestoreWatch.short


@dataclass(frozen=True)
class ServedTurn:
    """A whole turn as the cache saw it: what parking found in the slot, and its prompt's tokens."""

    how: SlotFound
    prompt: int              # the whole prompt, cached tokens included
    cached: int              # read from cache
    slot_seconds: float = 0.0  # parking's work in the slot before its send
    restores_off: str = ""     # why the backend's restores are off ("" when on)


@dataclass
class _Last:
    prefix: list[str]
    prompt: int


class CacheMisses:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._last: collections.OrderedDict[str, _Last] = collections.OrderedDict()
        self._recent: dict[str, collections.deque] = {}
        self._totals: dict[str, collections.Counter] = {}

    def observe(self, backend: str, key: str, blocks: list[tuple[str, str]], turn: ServedTurn) -> dict[str, Any]:
        """One whole turn of conversation `key`, whose prompt's blocks are `blocks`."""
        how, prompt, cached, slot_seconds = turn.how, turn.prompt, turn.cached, turn.slot_seconds
        prefix = [h for _, h in blocks]
        last = self._last.get(key)
        at = why = ""
        if last is None:
            reason = "new"
        else:
            n = 0
            for x, y in zip(last.prefix, prefix):
                if x != y:
                    break
                n += 1
            if n < len(last.prefix) and n < len(prefix):
                reason, at = "prefix_changed", blocks[n][0]
            elif how is SlotFound.UNPARKED:
                reason = "unparked"
                if short(last.prompt, cached):
                    reason, why = "restore_ineffective", f"restore read back {cached} of {last.prompt} tokens"
            elif how is SlotFound.SWITCHED and cached < EVICTED_BELOW * last.prompt:
                reason = "switched"
            elif cached < EVICTED_BELOW * last.prompt:
                reason = "evicted"
            else:
                reason = "hit"
            if turn.restores_off and (reason == "switched" or (reason == "evicted" and how is SlotFound.EMPTY)):
                reason, why = "restore_ineffective", turn.restores_off
        self._last[key] = _Last(prefix, prompt)
        self._last.move_to_end(key)
        while len(self._last) > MAX_CONVERSATIONS:
            self._last.popitem(last=False)
        computed = max(prompt - cached, 0)
        self.metrics.cache_turns.labels(backend, reason).inc()
        self.metrics.cache_computed.labels(backend, reason).inc(computed)
        if at:
            k = kind(at)
            self.metrics.cache_prefix_changes.labels(backend, k if k in ("system", "tools", "messages")
                                                     else "other").inc()
        seen = {"time": time.time(), "conversation": key[:8], "reason": reason, "prompt": prompt,
                "cached": cached, "computed": computed, "slot_seconds": round(slot_seconds, 3)}
        if at:
            seen["at_token"], seen["at_block"] = cached, at
        if why:
            seen["why"] = why
        self._recent.setdefault(backend, collections.deque(maxlen=RECENT)).append(seen)
        self._totals.setdefault(backend, collections.Counter())[reason] += 1
        log.info("cache %s conversation %s: %s, %d of %d prompt tokens from cache, %d computed%s%s", backend,
                 key[:8], reason + (f" ({why})" if why else ""), cached, prompt, computed,
                 f", prefix changed at token {cached} ({at})" if at else "",
                 f", {slot_seconds * 1000:.0f} ms parking" if slot_seconds else "")
        return seen

    def snapshot(self, backend: str) -> dict[str, Any]:
        """For /health and `make status`: turns by reason, and the last few."""
        return {"turns": dict(self._totals.get(backend, {})), "recent": list(self._recent.get(backend, ()))[-5:]}
