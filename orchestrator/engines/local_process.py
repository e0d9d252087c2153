"""The command line of the process behind a backend on this machine, where Linux's /proc shows it: a
supervised one's by its pid, a server someone else started by the loopback port it listens on. What
an engine was started with and reports nowhere (vLLM's --max-num-seqs) is read from there."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# /proc/net/tcp's state column for a listening socket.
LISTEN = "0A"
# Local addresses that a loopback URL reaches, as /proc/net/tcp{,6} write them: 127.0.0.1 and 0.0.0.0,
# ::1 and :: (a process on the same port of another address is another server).
REACHED = {"0100007F", "00000000", "00000000000000000000000001000000", "00000000000000000000000000000000"}


def command_line(pid: int | None) -> str | None:
    """A process's command line, quoted; None when it cannot be read."""
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes() if pid else b""
    except (OSError, ValueError):
        return None
    words = [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]
    return shlex.join(words) if words else None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            address, _, hex_port = f[1].rpartition(":") if len(f) > 9 else ("", "", "")
            if f[3:4] == [LISTEN] and address in REACHED and int(hex_port, 16) == port:
                inodes.add(f[9])
    return inodes


def listener_command_line(url: str) -> str | None:
    """The command line of the process listening on `url`'s port, for a loopback URL; None when it is
    not on this machine or not readable (another user's process). Reads every process's open files:
    called once per start of a backend, in a thread."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK and f"[{parts.hostname}]" not in LOOPBACK:
        return None
    inodes = _listening_inodes(parts.port or (443 if parts.scheme == "https" else 80))
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return command_line(int(pid))
            except OSError:
                continue
    return None


def option(command: str | None, *names: str) -> str | None:
    """The value of the last of `names` in a command line (`--x V` or `--x=V`); None when absent."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return None
    found = None
    for i, w in enumerate(words):
        name, eq, value = w.partition("=")
        if name in names:
            found = value if eq else (words[i + 1] if i + 1 < len(words) else None)
    return found
