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

This is the act; the state it reads and changes (what the slot was last given, the paces measured)
is the backend's `Parking` record (kv/parking.py), written only through its methods, and the saves
are the store's (kv/store.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..backends.gateway import Backend, Gateway
from ..backends.inflight import Call
from ..conversation import Conversation
from ..kv.parking import SlotFound
from ..kv.results import RestoreResult, SaveResult
from .accounting import Outcome

log = logging.getLogger(__name__)


@dataclass
class SlotTurn:
    """What the slot held when a request was granted, and what was done before its send."""

    how: SlotFound = SlotFound.UNKNOWN
    park: float = 0.0      # seconds spent saving the outgoing conversation
    checkpoint: float = 0.0
    unpark: float = 0.0    # seconds spent restoring the incoming one
    restored: int = 0      # tokens the unpark put back

    @property
    def seconds(self) -> float:
        return self.park + self.checkpoint + self.unpark


def parks(backend: Backend) -> bool:
    return backend.kv is not None and backend.config.kv_park and backend.queue.slots == 1


async def before_send(gw: Gateway, backend: Backend, conversation: Conversation, call: Call) -> SlotTurn:
    """Park, checkpoint and unpark as needed, in a task the slot waits for (see the module's doc)."""
    turn = SlotTurn()
    # Not where a restore cannot bring a save back (kv/restorable.py: a sliding-window model without
    # --swa-full, or restores that read back less): a switch there costs a prefill either way.
    if not parks(backend) or backend.kv.watch.off:
        if backend.parking is not None and backend.queue.slots == 1:
            # Parking off: only what the slot was last given, for cachemiss to tell a switch from an eviction.
            turn.how = backend.parking.found(conversation.key)
            backend.parking.given(conversation.key)
        return turn
    call.admin = asyncio.ensure_future(_prepare(gw, backend, conversation, turn))
    await asyncio.shield(call.admin)
    return turn


def keep_seconds(backend: Backend, tokens: int, cap: float) -> float:
    """How long a one-slot backend's slot may wait for its conversation's next turn while others wait:
    what a change of conversation would cost it, at most `cap`. With parking, a save and a later
    restore (Parking.keep_seconds); without parking (a switch costs a re-prefill), the cap."""
    if backend.queue.slots != 1 or cap <= 0:
        return 0.0
    return backend.parking.keep_seconds(tokens, cap) if parks(backend) else cap


def answered(backend: Backend, conversation: Conversation, outcome: Outcome, turn: SlotTurn) -> None:
    """The slot's request ended whole: it holds that conversation's prompt and answer. A streamed
    turn that computed enough of its prompt measures the backend's prefill pace (to its first
    content, less the parking before its send): what a checkpoint's unsaved tokens would cost."""
    p = backend.parking
    if p is None:
        return
    p.ended_whole(conversation.key)
    if outcome.first_content is not None and outcome.granted is not None:
        p.prefill_measured(outcome.first_content - outcome.granted - turn.seconds, outcome.input_tokens)


async def _prepare(gw: Gateway, backend: Backend, conversation: Conversation, turn: SlotTurn) -> None:
    try:
        await _save_outgoing(gw, backend, conversation.key, turn)
        await _unpark(gw, backend, conversation.key, turn)
    except Exception as e:  # noqa: BLE001 - parking is an optimisation: the request goes on, cold
        log.warning("backend %s: parking failed (%s: %s); the turn runs cold", backend.name, type(e).__name__, e)
    finally:
        # From here the slot is given to this conversation, whatever it held (a failed restore
        # emptied it: this request fills it).
        backend.parking.given(conversation.key)


async def _save_outgoing(gw: Gateway, backend: Backend, key: str, turn: SlotTurn) -> None:
    b, p, cfg = backend.kv, backend.parking, backend.config
    if not (p.holder_whole and b.latest is not None and b.latest[0].key == p.holder):
        return  # the slot holds something the gateway cannot name (a cut-off request, a restart)
    conversation, tokens = b.latest
    unsaved = tokens - b.tokens_saved(p.holder)
    if tokens < cfg.kv_park_min_tokens or unsaved <= 0:
        return
    action = "park" if p.holder != key else "checkpoint"
    if action == "checkpoint" and not p.checkpoint_pays(cfg.kv_checkpoint_share, unsaved, tokens):
        return
    if p.save_too_slow(action == "park", tokens, cfg.kv_park_max_seconds):
        gw.metrics.kv_parks.labels(backend.name, action, "too_slow").inc()
        return
    saved = await gw.kv.save_held(b, conversation, tokens)
    if saved.result is SaveResult.SAVED:
        p.save_measured(saved.seconds, tokens)
    setattr(turn, action, saved.seconds)
    gw.metrics.kv_parks.labels(backend.name, action, "ok" if saved.result is SaveResult.SAVED else "failed").inc()
    gw.metrics.kv_park_seconds.labels(backend.name, action).observe(saved.seconds)


async def _unpark(gw: Gateway, backend: Backend, key: str, turn: SlotTurn) -> None:
    b, p = backend.kv, backend.parking
    turn.how = p.found(key)
    if turn.how is SlotFound.SAME:
        if p.restored == key:
            # The restart's restore put it back for this waiter; /slots cannot tell (it shows no
            # tokens after a restore), and restoring it again would only repeat the restore's time.
            turn.how = SlotFound.UNPARKED
            return
        # The slot was last given this conversation; the server says whether it still holds it.
        if await gw.kv.slot_tokens(b) > 0:
            return
        turn.how = SlotFound.EMPTY
    t0 = time.monotonic()
    restore = await gw.kv.restore_key(b, key)
    if restore.result is RestoreResult.NONE:
        return
    turn.unpark = time.monotonic() - t0
    restored = restore.result is RestoreResult.RESTORED
    gw.metrics.kv_parks.labels(backend.name, "unpark", "ok" if restored else "failed").inc()
    gw.metrics.kv_park_seconds.labels(backend.name, "unpark").observe(turn.unpark)
    if restored:
        turn.how, turn.restored = SlotFound.UNPARKED, restore.tokens
