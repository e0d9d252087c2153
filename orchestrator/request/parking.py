"""Park, unpark and checkpoint: the slot's conversations kept on disk so none pays a prefill twice.

On a one-slot llama-server every change of conversation replaces the slot's KV cache, and the
host-memory prompt cache (`--cache-ram`) keeps the old one only while it fits. So before a granted
request is sent, holding its lease (no generation can overlap):

- the slot's conversation is saved when another conversation takes the slot (a park), or when the
  same one goes on and the tokens not yet on disk would cost more to compute again than the save
  costs, at the paces measured on this backend, or are more than `kv_checkpoint_share` of it (a
  checkpoint: a busy tool loop is never idle long enough for the idle save, and a crash would lose
  it all). A save costs ~2% of the prefill it spares (measured, config.py), so it pays from
  `kv_park_min_tokens` up; one expected to take longer than `kv_park_max_seconds` is left to the
  idle save;
- the incoming conversation's save is restored (an unpark) when the server says the slot does not
  hold it: another conversation's request was the last one it was given, or `/slots` shows it empty.

Nothing here can make an answer wrong: llama-server compares each prompt's tokens with what the
slot holds and computes the rest, and a failed restore leaves the slot empty, so at worst a turn is
cold. The work runs in a task of its own that the slot waits for even when the client leaves
(release.after_admin): a slot action is never abandoned mid-way beside a next generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..backends.gateway import Backend, Call, Gateway
from ..conversation import Conversation
from ..kv.store import BackendSaves
from .accounting import Outcome

log = logging.getLogger(__name__)

# A turn computing fewer prompt tokens says more of a request's fixed cost (its template, its
# tokenizing, its first token) than of the prefill's pace.
PACE_MIN_TOKENS = 256
# After this many parks skipped in a row as dearer than a prefill, one runs anyway: a save pace measured
# on a small save (its fixed cost spread on few tokens) must not switch parking off for good.
PARK_RETRY_AFTER = 8


@dataclass
class SlotTurn:
    """What the slot held when a request was granted, and what was done before its send."""

    how: str = "unknown"   # same | switched | unparked | empty | unknown (not a parking backend)
    park: float = 0.0      # seconds spent saving the outgoing conversation
    checkpoint: float = 0.0
    unpark: float = 0.0    # seconds spent restoring the incoming one
    restored: int = 0      # tokens the unpark put back

    @property
    def seconds(self) -> float:
        return self.park + self.checkpoint + self.unpark


def parks(backend: Backend) -> bool:
    return backend.kv is not None and backend.config.kv_park and backend.config.slots == 1


def _switched(backend: Backend, key: str, turn: SlotTurn) -> None:
    """Parking off: only what the slot was last given, for cachemiss to tell a switch from an eviction."""
    b = backend.kv
    turn.how = "empty" if b.holder is None else "same" if b.holder == key else "switched"
    b.holder, b.holder_whole = key, False


async def before_send(gw: Gateway, backend: Backend, conversation: Conversation, call: Call) -> SlotTurn:
    """Park, checkpoint and unpark as needed, in a task the slot waits for (see the module's doc)."""
    turn = SlotTurn()
    if not parks(backend):
        if backend.kv is not None and backend.config.slots == 1:
            _switched(backend, conversation.key, turn)
        return turn
    call.admin = asyncio.ensure_future(_prepare(gw, backend, conversation, turn))
    await asyncio.shield(call.admin)
    return turn


def keep_seconds(backend: Backend, tokens: int, cap: float) -> float:
    """How long a one-slot backend's slot may wait for its conversation's next turn while others wait:
    what a change of conversation would cost it, at most `cap`. With parking, that is a save and a
    later restore of its `tokens` at the last save's measured pace (a restore is faster: an upper
    bound); without a measured pace, or without parking (a switch costs a re-prefill), the cap."""
    if backend.config.slots != 1 or cap <= 0:
        return 0.0
    if parks(backend) and backend.kv.save_pace > 0:
        return min(cap, 2 * backend.kv.save_pace * tokens)
    return cap


def answered(backend: Backend, conversation: Conversation, outcome: Outcome, turn: SlotTurn) -> None:
    """The slot's request ended whole: it holds that conversation's prompt and answer. A streamed
    turn that computed enough of its prompt measures the backend's prefill pace (to its first
    content, less the parking before its send): what a checkpoint's unsaved tokens would cost."""
    b = backend.kv
    if b is None:
        return
    if b.holder == conversation.key:
        b.holder_whole = True
    if outcome.first_content is not None and outcome.granted is not None and outcome.input_tokens >= PACE_MIN_TOKENS:
        b.prefill_pace = max(0.0, outcome.first_content - outcome.granted - turn.seconds) / outcome.input_tokens


def checkpoint_pays(b: BackendSaves, share: float, unsaved: int, tokens: int) -> bool:
    """Whether to save a busy conversation before its next turn: the tokens not on disk would cost
    more to compute again after a crash than saving it all costs now (both paces measured on this
    backend), or they pass `share` of it (the bound on what a crash can lose, and the rule until
    both paces are measured)."""
    if unsaved > share * tokens:
        return True
    return b.prefill_pace > 0 and b.save_pace > 0 and unsaved * b.prefill_pace > tokens * b.save_pace


async def _prepare(gw: Gateway, backend: Backend, conversation: Conversation, turn: SlotTurn) -> None:
    b = backend.kv
    try:
        await _save_outgoing(gw, backend, conversation.key, turn)
        await _unpark(gw, backend, conversation.key, turn)
    except Exception as e:  # noqa: BLE001 - parking is an optimisation: the request goes on, cold
        log.warning("backend %s: parking failed (%s: %s); the turn runs cold", backend.name, type(e).__name__, e)
        b.holder = None
    finally:
        # From here the slot is given to this conversation, whatever it held.
        b.holder, b.holder_whole, b.restored = conversation.key, False, None


async def _save_outgoing(gw: Gateway, backend: Backend, key: str, turn: SlotTurn) -> None:
    b, cfg = backend.kv, backend.config
    if not (b.holder_whole and b.latest is not None and b.latest[0].key == b.holder):
        return  # the slot holds something the gateway cannot name (a cut-off request, a restart)
    conversation, tokens = b.latest
    unsaved = tokens - max(b.saved.get(b.holder, 0), 0)
    if tokens < cfg.kv_park_min_tokens or unsaved <= 0:
        return
    action = "park" if b.holder != key else "checkpoint"
    if action == "checkpoint" and not checkpoint_pays(b, cfg.kv_checkpoint_share, unsaved, tokens):
        return
    # Skipped when it would hold the waiting request too long, or (a park) longer than computing the
    # conversation again would take it later: both at the paces measured on this backend.
    expected = b.save_pace * tokens
    dearer = action == "park" and expected > b.prefill_pace * tokens > 0
    if expected > cfg.kv_park_max_seconds or (dearer and b.parks_skipped < PARK_RETRY_AFTER):
        b.parks_skipped += dearer
        gw.metrics.kv_parks.labels(backend.name, action, "too_slow").inc()
        return
    b.parks_skipped = 0
    result, took = await gw.kv.save_held(b, conversation, tokens)
    if result == "saved":
        b.save_pace = took / tokens
    setattr(turn, action, took)
    gw.metrics.kv_parks.labels(backend.name, action, "ok" if result == "saved" else "failed").inc()
    gw.metrics.kv_park_seconds.labels(backend.name, action).observe(took)


async def _unpark(gw: Gateway, backend: Backend, key: str, turn: SlotTurn) -> None:
    b = backend.kv
    if b.holder == key:
        if b.restored == key:
            # The restart's restore put it back for this waiter; /slots cannot tell (it shows no
            # tokens after a restore), and restoring it again would only repeat the restore's time.
            turn.how = "unparked"
            return
        # The slot was last given this conversation; the server says whether it still holds it.
        if await gw.kv.slot_tokens(b) > 0:
            turn.how = "same"
            return
        turn.how = "empty"
    else:
        turn.how = "switched" if b.holder is not None else "empty"
    t0 = time.monotonic()
    result, note = await gw.kv.restore_key(b, key)
    if result == "none":
        return
    turn.unpark = time.monotonic() - t0
    gw.metrics.kv_parks.labels(backend.name, "unpark", "ok" if result == "restored" else "failed").inc()
    gw.metrics.kv_park_seconds.labels(backend.name, "unpark").observe(turn.unpark)
    if result == "restored":
        turn.how, turn.restored = "unparked", int(note.get("n_tokens", 0))
        b.saved[key] = turn.restored
    else:
        b.holder = None  # emptied by the failed restore: cold, never wrong
