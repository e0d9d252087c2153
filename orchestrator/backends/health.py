"""Each backend's state, from its /health, from supervisord, and from what requests to it meet.

A backend that refuses a connection is marked down at once and its queue is
held: queued requests wait for it to come back instead of each failing on its
own. Polling reopens the queue as soon as /health answers 200 again. A backend
down for longer than the grace, or FATAL in supervisord, fails its waiters
with an error that names it and its log.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import xmlrpc.client
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..config import BackendConfig
from ..engines.base import Engine, Load, Served
from ..engines.model_cache import ModelCache
from ..engines.llama_server import program_name
from ..engines.local_process import command_line, listener_command_line
from ..engines.rpc_workers import supervised_workers
from ..engines.supervisord import rpc_at
from ..errors import BackendFailed, GatewayError
from ..metrics import Metrics
from ..slots import SlotQueue

log = logging.getLogger(__name__)


class State(str, Enum):
    UNKNOWN = "unknown"    # not yet checked; requests are let through
    LOADING = "loading"    # answers 503 while it loads its model
    READY = "ready"
    DOWN = "down"          # refuses connections (crashed, restarting)
    FAILED = "failed"      # FATAL in supervisord: will not come back by itself


class ProcessWatch:
    """Asks supervisord about one program: a new pid is a restart, FATAL is final. `log_file`: where
    supervisord writes the program's output, named in errors and on /health."""

    def __init__(self, socket: str, program: str, log_file: str = "", workers: tuple[str, ...] = ()) -> None:
        self.socket = socket
        self.program = program
        self.log_file = log_file
        # The programs of its llama.cpp RPC workers (engines/rpc_workers.py), their states as last heard.
        self.workers: dict[str, str] = dict.fromkeys(workers, "")

    def _info(self) -> dict[str, Any] | None:
        try:
            return rpc_at(self.socket).getProcessInfo(self.program)
        except (OSError, xmlrpc.client.Error):
            return None

    async def info(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._info)

    def _worker_infos(self) -> list[dict[str, Any]]:
        try:
            return [p for p in rpc_at(self.socket).getAllProcessInfo() if p.get("name") in self.workers]
        except (OSError, xmlrpc.client.Error):
            return []

    async def worker_infos(self) -> list[dict[str, Any]]:
        """supervisord's word on each of its RPC workers ([] when it has none, or no answer)."""
        return await asyncio.to_thread(self._worker_infos) if self.workers else []

    def _restart(self) -> None:
        rpc = rpc_at(self.socket)
        # stopProcess waits for the exit (SIGTERM, SIGKILL after stopwaitsecs): a server wedged in
        # a grammar does not answer SIGTERM between tokens.
        try:
            rpc.stopProcess(self.program, True)
        except xmlrpc.client.Fault:
            pass  # not running: start it all the same
        rpc.startProcess(self.program, False)

    async def restart(self) -> None:
        await asyncio.to_thread(self._restart)


class BackendHealth:
    """One backend's state, checked through its engine (`engine.health`, `engine.context_size`) and
    supervisord (`watch`), and shown in `metrics` (up, restarts) when given."""

    def __init__(self, engine: Engine, queue: SlotQueue, *, grace: float = 300.0,
                 watch: ProcessWatch | None = None, metrics: Metrics | None = None,
                 restore: Callable[[], Awaitable[dict | None]] | None = None) -> None:
        self.engine = engine
        self.backend = engine.backend
        self.queue = queue
        self.grace = grace
        self.watch = watch
        self.log_file = watch.log_file if watch is not None else ""
        self.metrics = metrics
        self.state = State.UNKNOWN
        self.since = time.time()
        self.last_error = ""
        self.restarts = 0
        self.last_restart: float | None = None
        self.pid: int | None = None
        self._pids: collections.deque[int] = collections.deque(maxlen=16)  # recent pids of its process
        # What its engine says it serves (its context, model name, batch), read at every (re)start; the
        # context is what `orchestrator env` hands Claude Code.
        self.served = Served()
        self._undescribed = False
        # What the engine says it runs now (engines/base.py's Load), read at every poll; None: it does not say.
        self.load: Load | None = None
        # What kind of cache its model keeps (engines/model_cache.py), read at every (re)start.
        self.model: ModelCache | None = None
        self.process_state = ""
        # Requests the gateway gave up on that still hold a slot past gateway.release_timeout_seconds
        # (release_when_idle): a server wedged on one (a grammar it cannot build) says "ready" on
        # /health all along, and would hold the slot forever.
        self.stuck = 0
        self._restarting: asyncio.Task | None = None
        self._worker_restart_due = False  # a worker stopped: its head is restarted once they all run
        self._worker_pids: dict[str, int] = {}
        self.changed = asyncio.Event()
        # KV persistence: awaited between "the server answers again" and "its queue reopens".
        self._restore = restore
        self.last_restore: dict | None = None
        if restore is not None:
            # Until the first check: a request let through now could run before the restore.
            queue.hold()

    @property
    def up(self) -> bool:
        return self.state in (State.READY, State.UNKNOWN)

    @property
    def serving(self) -> bool:
        """Up, and no slot held past its bound: worth sending optional work (background) to."""
        return self.up and not self.stuck

    def mark_stuck(self, why: str) -> None:
        """A slot is held past its bound by a request the gateway gave up on. A supervised background
        server is restarted (a title is worth nothing a minute late); a main one keeps its cache and
        is only shown as stuck, for its operator to judge."""
        self.stuck += 1
        self.last_error = why
        if self.watch is not None and self.backend.role == "background" and self._restarting is None:
            log.warning("backend %s: restarting it through supervisord: %s", self.backend.name, why)
            self._restarting = asyncio.create_task(self._restart(), name=f"restart:{self.backend.name}")

    def unstuck(self) -> None:
        self.stuck = max(0, self.stuck - 1)

    async def _restart(self) -> None:
        try:
            await self.watch.restart()
        except (OSError, xmlrpc.client.Error) as e:
            log.warning("backend %s: restart through supervisord failed: %s", self.backend.name, e)
        finally:
            self._restarting = None

    def _where(self) -> str:
        return f"; see {self.log_file}" if self.log_file else ""

    def set(self, state: State, error: str = "") -> None:
        if error:
            self.last_error = error
        if state is self.state:
            return
        log.info("backend %s: %s -> %s %s", self.backend.name, self.state.value, state.value, error)
        self.state = state
        self.since = time.time()
        if self.up:
            self.queue.open()
        elif state is State.FAILED:
            message = f"backend {self.backend.name!r} failed: {self.last_error}{self._where()}"
            self.queue.fail(lambda: BackendFailed(message, retry_after=self.queue.retry_after))
        else:
            self.queue.hold()
        if self.metrics is not None:
            self.metrics.backend_up.labels(self.backend.name).set(1 if self.up else 0)
        self.poke()

    def poke(self) -> None:
        """Wake the poller: check again now."""
        self.changed.set()
        self.changed = asyncio.Event()

    def mark_down(self, error: str) -> None:
        if self.state is not State.FAILED:
            self.set(State.DOWN, error)

    async def check(self, timeout: float) -> State:
        if self.watch is not None and await self._check_process():
            return self.state
        lost = self._workers_lost()
        if lost or self._worker_restart_due:  # its head says "ok" until it next uses the dead worker, then aborts
            self.mark_down(f"its RPC worker {lost} is not running" if lost else
                           "waiting for its llama-server to restart: one of its RPC workers was restarted")
            if not lost and self._restarting is None:  # the restart failed, or its event was missed: again
                self._restarting = asyncio.create_task(self._restart(), name=f"restart:{self.backend.name}")
            return self.state
        try:
            status = await self.engine.health(timeout)
        except GatewayError as e:
            self.mark_down(e.message)
            self._past_grace()
            return self.state
        # A remote API without /health answers 404: it answers, so it is up.
        if status == 503:
            self.set(State.LOADING, "loading model (HTTP 503)")
            return self.state
        if self.state is not State.READY:  # read once per (re)start, not on every poll
            # What the process really runs (llama-server's --swa-full, vLLM's --max-num-seqs), where
            # readable: a supervised one's by its pid, another on this machine by its port.
            self.engine.command_line = (command_line(self.pid) if self.watch is not None else
                                        await asyncio.to_thread(listener_command_line, self.backend.url))
            await self._describe(timeout)
            self.model = await self.engine.model_cache() or self.model
            if self._restore is not None:
                since, restarts = self.since, self.restarts
                note = await self._restore()  # bounded; never raises
                self.last_restore = note or self.last_restore
                if (self.since, self.restarts) != (since, restarts):
                    return self.state  # it went down (or FATAL) meanwhile: the next check decides
        elif self._undescribed:  # its first description failed: asked again until it answers
            await self._describe(timeout)
        self.set(State.READY)
        await self._read_load(timeout)
        return self.state

    async def _read_load(self, timeout: float) -> None:
        """The engine's own word on what it runs and holds, other clients' requests included: those not
        the gateway's are the queue's `outside`, which placement counts (backends/pool.py)."""
        try:
            self.load = await self.engine.load(timeout)
        except GatewayError:
            self.load = None
        load = self.load
        self.queue.outside = max(0, load.running + load.waiting - self.queue.busy) if load is not None else 0

    @property
    def n_ctx(self) -> int | None:
        """The context a request may fill, as its engine says; None when unknown."""
        return self.served.n_ctx

    async def _describe(self, timeout: float) -> None:
        """What its engine serves (engines/), and the queue sized to it (slots = 0). When the engine
        cannot say now, what it said before stands, and it is asked again at the next poll: a vLLM
        sent the client's model name would refuse every request."""
        try:
            self.served = await self.engine.describe(timeout)
        except GatewayError as e:
            self._undescribed = True
            log.warning("backend %s: could not read what it serves (asked again): %s", self.backend.name, e.message)
            return
        self._undescribed = False
        if not self.backend.slots and self.served.batch:  # slots = 0: as many as the engine runs
            self.queue.resize(self.served.batch)

    async def _check_process(self) -> bool:
        """True when supervisord's word settles the state (FATAL)."""
        info = await self.watch.info()
        if info is None:
            return False
        for worker in await self.watch.worker_infos():
            self.observe_worker(worker.get("name", ""), worker.get("statename", ""), worker.get("pid") or None)
        return self.observe_process(info.get("statename", ""), info.get("pid") or None)

    def observe_process(self, state: str, pid: int | None) -> bool:
        """What supervisord says of the backend's process, polled or from its events.
        A new pid is a restart; FATAL is final until the process runs again."""
        self.process_state = state
        # Only a process that runs says which pid is current: an EXITED event
        # may arrive after a poll has already seen the new process, still
        # naming the old pid, and one crash must count as one restart.
        if pid and state in ("STARTING", "RUNNING") and pid not in self._pids:
            self._worker_restart_due = False  # a new head connects to the workers as they are now
            if self.pid:
                self.restarts += 1
                self.last_restart = time.time()
                log.warning("backend %s: process restarted (pid %s -> %s)", self.backend.name, self.pid, pid)
                if self.metrics is not None:
                    self.metrics.backend_restarts.labels(self.backend.name).inc()
            self.pid = pid
            self._pids.append(pid)
        if state == "FATAL":
            self.set(State.FAILED, f"its process is FATAL in supervisord (could not start after "
                                   f"{self.backend.start_retries} retries)")
            return True
        if state in ("EXITED", "BACKOFF", "STOPPED", "STOPPING"):
            self.mark_down(f"its process is {state} in supervisord")
        elif self.state is State.FAILED:
            # Started again by hand (supervisorctl start): back to ordinary checks.
            self.set(State.DOWN, "restarted after FATAL")
        return False

    def _workers_lost(self) -> str:
        watch = self.watch
        return next((p for p, s in watch.workers.items() if s and s != "RUNNING"), "") if watch else ""

    def observe_worker(self, program: str, state: str, pid: int | None = None) -> None:
        """What supervisord says of one of its RPC workers, polled or from its events. One that stops
        (or runs with a new pid) takes the backend down; once every worker runs again the head is
        restarted: it never reconnects to a restarted worker, and aborts at its next use of it
        (docs/rpc-split.md)."""
        watch = self.watch
        if watch is None or program not in watch.workers:
            return
        watch.workers[program] = state
        known = self._worker_pids.get(program)
        if pid:
            self._worker_pids[program] = pid
        if state not in ("RUNNING", "STARTING") or (pid and known and pid != known):
            self._worker_restart_due = True
            self.mark_down(f"its RPC worker {program} is {state} in supervisord")
        if state == "RUNNING" and self._worker_restart_due and not self._workers_lost() and self._restarting is None:
            log.warning("backend %s: its RPC workers run again: restarting its llama-server, which does not "
                        "reconnect to them", self.backend.name)
            self._restarting = asyncio.create_task(self._restart(), name=f"restart:{self.backend.name}")

    def _past_grace(self) -> None:
        down_for = time.time() - self.since
        if self.state is State.DOWN and down_for > self.grace and self.queue.is_open is False:
            message = (f"backend {self.backend.name!r} has been down for {down_for:.0f}s "
                       f"(queue.down_grace_seconds = {self.grace:g}): {self.last_error}{self._where()}")
            self.queue.fail(lambda: BackendFailed(message, retry_after=self.queue.retry_after))

    async def poll(self, interval: float) -> None:
        while True:
            state = await self.check(timeout=max(interval, 1.0))
            # Poll fast while down so a restarted server is used the moment it is ready.
            delay = interval if state in (State.READY, State.FAILED) else min(interval, 0.25)
            try:
                async with asyncio.timeout(delay):
                    await self.changed.wait()
            except TimeoutError:
                pass

    def snapshot(self) -> dict:
        # "stuck": answering /health, but a slot is held past its bound (mark_stuck).
        state = "stuck" if self.stuck and self.up else self.state.value
        return {"name": self.backend.name, "url": self.backend.url, "role": self.backend.role,
                "state": state, "since": self.since, "last_error": self.last_error,
                "slots": self.queue.slots, "busy": self.queue.busy, "queued": self.queue.depth,
                "restarts": self.restarts, "last_restart": self.last_restart, "pid": self.pid,
                "process_state": self.process_state, "log": self.log_file, "n_ctx": self.n_ctx,
                "served_model": self.served.model,
                "engine_load": asdict(self.load) if self.load is not None else None,
                "kv_restore": self.last_restore,
                "rpc_workers": dict(self.watch.workers) if self.watch is not None and self.watch.workers else None, "model_cache": self.model.view() if self.model else None}


def watch_for(backend: BackendConfig, socket: str, log_dir: str) -> ProcessWatch | None:
    """The supervisord watch of a supervised backend, with its log file; None otherwise."""
    if not socket or not backend.command:
        return None
    program = program_name(backend)
    return ProcessWatch(socket, program, str(Path(log_dir) / f"{program}.log") if log_dir else "",
                        workers=tuple(name for name, _, _ in supervised_workers(backend)))
