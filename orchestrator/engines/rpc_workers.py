"""llama.cpp's RPC workers (its tools/rpc; this source names the binary ggml-rpc-server, older ones
rpc-server) that a backend's llama-server splits its model across with `--rpc HOST:PORT,...`: the
head's option, the supervisord program of each worker on this machine, and which binary runs them.

What a split does when a worker dies, measured on this build (docs/rpc-split.md): the head aborts
(SIGABRT, no error answer) the next time it uses that worker, mid-stream or at the next request, and
until then says "ok" on /health; a head cannot start while a worker is down; a head never reconnects
to a restarted worker. So when a worker goes, the backend is down until the worker is back and the
head has been restarted (backends/health.py does both through supervisord)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from ..config import BackendConfig
from .local_process import LOOPBACK

# The worker's binary, by its name in this llama.cpp and in older ones.
BINARIES = ("ggml-rpc-server", "rpc-server")


def split_address(worker: str) -> tuple[str, int]:
    """("HOST", PORT) of a worker's "HOST:PORT" (ValueError if it is not one)."""
    host, sep, port = worker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{worker!r} is not HOST:PORT")
    return host, int(port)


def worker_program(backend: BackendConfig, index: int) -> str:
    return f"rpc-{backend.name}-{index}"


def supervised_workers(backend: BackendConfig) -> list[tuple[str, str, int]]:
    """(program, host, port) of each worker supervisord runs for a supervised backend: those on this
    machine (a loopback host); a worker elsewhere is run by whoever runs that machine."""
    if not backend.command:
        return []
    out = []
    for i, worker in enumerate(backend.rpc_workers):
        host, port = split_address(worker)
        if host in LOOPBACK:
            out.append((worker_program(backend, i), host, port))
    return out


def with_rpc(backend: BackendConfig, command: str) -> str:
    """The head's command with `--rpc` naming its workers, unless the command names them itself."""
    if not backend.rpc_workers or any(w == "--rpc" or w.startswith("--rpc=") for w in shlex.split(command)):
        return command
    return f"{command} --rpc {shlex.quote(','.join(backend.rpc_workers))}"


def worker_command(binary: str, host: str, port: int) -> str:
    return f"{shlex.quote(binary)} -H {shlex.quote(host)} -p {port}"


def find_rpc_server(llama_server: str | None) -> str | None:
    """The worker binary: beside the llama-server binary (deploy/install-llama-server.sh builds both),
    else on PATH; None when there is none."""
    for name in BINARIES:
        beside = Path(llama_server).parent / name if llama_server else None
        if beside is not None and beside.is_file():
            return str(beside)
    for name in BINARIES:
        if shutil.which(name):
            return shutil.which(name)
    return None
