"""`orchestrator status`: what supervisord and the gateway say, in one terminal screen."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import xmlrpc.client
from typing import Any

from . import supervise
from .config import Config


def fetch_health(config: Config, timeout: float = 3.0) -> dict[str, Any] | None:
    g = config.gateway
    try:
        with urllib.request.urlopen(f"http://{g.host}:{g.port}/health", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def render(config: Config, paths: supervise.StackPaths) -> str:
    out = []
    try:
        procs = supervise.processes(paths) if paths.socket.exists() else None
    except (OSError, xmlrpc.client.Error):
        procs = None
    if procs is None:
        out.append(f"supervisord: not running (no answer on {paths.socket})")
    else:
        out.append("programs (supervisord):")
        for p in procs:
            out.append(f"  {p['name']:<20} {p['statename']:<9} pid {p['pid'] or '-':<8} {p['description']}")
    health = fetch_health(config)
    g = config.gateway
    if health is None:
        out.append(f"gateway: not answering on http://{g.host}:{g.port}")
        return "\n".join(out)
    out.append(f"gateway: http://{g.host}:{g.port} {health['status']}, up {health['gateway']['uptime_seconds']:.0f}s")
    out.append(f"  {'backend':<12} {'state':<8} {'busy':>4}/{'slots':<5} {'queued':>6} {'restarts':>8}  last restart")
    for b in health["backends"]:
        out.append(f"  {b['name']:<12} {b['state']:<8} {b['busy']:>4}/{b['slots']:<5} {b['queued']:>6} "
                   f"{b.get('restarts', 0):>8}  {_ago(b.get('last_restart'))}")
        if b["state"] not in ("ready", "unknown") and b.get("last_error"):
            out.append(f"    why: {b['last_error']}" + (f" (log: {b['log']})" if b.get("log") else ""))
    return "\n".join(out)
