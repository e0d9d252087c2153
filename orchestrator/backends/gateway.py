"""The gateway's shared state: one `Backend` record per backend, and the `Gateway` that holds them.

Every request path (forward, background, synthetic answers, count_tokens) and every
view of the state (/health, the status page) reads from here; what runs is the
tracker's (inflight.py), which the Gateway holds. Built once per process by `build_gateway`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..config import BackendConfig, Config
from ..engines.base import Engine
from ..engines.choice import engine_for
from ..engines.upstream import UpstreamClient
from ..kv.cachemiss import CacheMisses
from ..kv.parking import Parking
from ..kv.results import RestoreResult
from ..kv.store import BackendSaves, KvPersistence
from ..metrics import Metrics
from ..slots import Limits, SlotQueue
from .counting import TokenCounter
from .health import BackendHealth, watch_for
from .inflight import InFlight, Tree
from .pool import Pool


@dataclass(eq=False)
class Backend:
    """One backend and everything the gateway keeps about it."""

    config: BackendConfig
    queue: SlotQueue
    health: BackendHealth
    # The server behind it, as the gateway asks it (engines/); its health and its saves ask the same one.
    engine: Engine
    # Its KV saves (kv/store.py) and what parking knows of its slot (kv/parking.py); None when its
    # slot is not saved.
    kv: BackendSaves | None = None
    parking: Parking | None = None
    # Slots held after their client left, until the backend lets go (release.py).
    held: set[asyncio.Task] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class Gateway:
    """Everything a handler needs; owned by the app, built once per process."""

    config: Config
    metrics: Metrics
    upstream: UpstreamClient
    counter: TokenCounter
    kv: KvPersistence
    backends: dict[str, Backend] = field(default_factory=dict)
    # Conversation affinity for the groups of several backends (None: least busy, always).
    pool: Pool | None = None
    # What runs: every request and send in flight, the one tracker (inflight.py).
    inflight: InFlight = field(default_factory=InFlight)
    # Why each main or agent turn's prompt missed the cache (cachemiss.py).
    misses: CacheMisses | None = None
    started: float = field(default_factory=time.time)

    def group(self, names: Iterable[str]) -> list[Backend]:
        return [self.backends[n] for n in names]

    @property
    def agents(self) -> Tree:
        """Claude Code's sessions and agents, queued or running (bounded): a view of what runs."""
        return self.inflight.agents

    def slot_use(self, backend: Backend) -> dict[str, int]:
        """What holds a backend's busy slots: sends in progress (client still there), and slots held
        after their client left; the rest is the gateway's own work (a KV save or restore)."""
        return {"sending": len(self.inflight.sends(backend.name)), "held_after_client_left": len(backend.held)}

    def kv_view(self, backend: Backend) -> dict[str, dict]:
        """Whether its slot saves can pay off (kv/restorable.py) and its save folder (kv/folder.py), for
        /health and the page; {} unsaved."""
        if backend.kv is None:
            return {}
        return {"kv_saves": backend.kv.watch.view(), "kv_folder": backend.kv.index.view()}

    def held_slots(self) -> int:
        """Slots held after their client left, over every backend."""
        return sum(len(b.held) for b in self.backends.values())


GATEWAY = web.AppKey("gateway", Gateway)


# Which engine adapter a backend gets; a test may give one of its own, as httpx takes a transport.
EngineFor = Callable[[BackendConfig, UpstreamClient], Engine]


def build_gateway(config: Config, registry: CollectorRegistry, engines: EngineFor = engine_for) -> Gateway:
    metrics = Metrics(registry, [b.name for b in config.backends])
    if config.background_backend is not None:
        metrics.add_background_backend(config.background_backend.name)
    upstream = UpstreamClient(connect_timeout=config.gateway.connect_timeout_seconds)
    counter = TokenCounter(upstream, timeout=config.gateway.count_tokens_timeout_seconds,
                           on_source=lambda source: metrics.count_tokens_source.labels(source).inc())
    gw = Gateway(config=config, metrics=metrics, upstream=upstream, counter=counter,
                 kv=KvPersistence(config, metrics), misses=CacheMisses(metrics))
    r = config.routing
    if r.affinity and len(config.main_backends) > 1:
        gw.pool = Pool(max_entries=r.affinity_max_conversations, max_wait=r.affinity_max_wait_seconds)
        for b in config.main_backends:
            metrics.add_pool_backend(b.name)
    q = config.queue
    for b in config.backends:
        # slots = 0: one until the engine says how many it runs (backends/health.py resizes the queue).
        queue = SlotQueue(b.name, b.slots or 1, Limits.of(q), on_preferred=metrics.cache_preferred.labels(b.name).inc)
        engine = engines(b, upstream)
        saves = gw.kv.attach(engine, queue)
        parking = Parking() if saves is not None else None
        health = BackendHealth(
            engine, queue, grace=q.down_grace_seconds, metrics=metrics,
            watch=watch_for(b, config.supervisor.socket, config.supervisor.log_dir),
            restore=functools.partial(_restore, gw.kv, saves, parking) if saves is not None else None)
        gw.backends[b.name] = Backend(b, queue, health, engine, kv=saves, parking=parking)
        metrics.backend_up.labels(b.name).set(1)
        metrics.watch_queue(b.name, lambda queue=queue: queue.slots, lambda queue=queue: queue.depth,
                            lambda queue=queue: queue.busy)
    return gw


async def _restore(kv: KvPersistence, saves: BackendSaves, parking: Parking) -> dict | None:
    """The restart's restore, before the backend's queue reopens: parking is told what the slot holds
    now; /health is given what it shows (None: the slot was warm, nothing to do). What its model is
    is read first: a model whose restores cannot work is not restored (kv/restorable.py)."""
    saves.watch.learned(await saves.engine.model_cache())
    done = await kv.restore(saves)
    if done.result is not RestoreResult.WARM:  # a warm slot holds what it held
        parking.restarted(done.key)  # only a restored save names one
    return done.view()
