"""`orchestrator status`: what supervisord and the gateway say, in one terminal screen."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import supervise
from .config import Config


class GatewayRefused(Exception):
    """The gateway answers but refuses us: it needs a key we do not have."""


def _get(config: Config, path: str, timeout: float) -> bytes | None:
    g = config.gateway
    headers = {"x-api-key": g.api_key} if g.api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(g.url + path, headers=headers), timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise GatewayRefused(f"the gateway at {g.url} refused {path} (HTTP {e.code}): set its key in "
                                 f"ORCHESTRATOR_API_KEY or gateway.api_key") from None
        return None
    except (OSError, urllib.error.URLError):
        return None


def fetch_health(config: Config, timeout: float = 3.0) -> dict[str, Any] | None:
    raw = _get(config, "/health", timeout)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile over cumulative (le, count) pairs, as Prometheus computes it."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le


def key_figures(metrics_text: str) -> dict[str, dict[str, Any]]:
    """Per backend, since the gateway started: requests, queue wait and TTFT p50/p95,
    cache hit ratio, tokens/s; plus the gateway's own synthetic and rejection counts."""
    samples: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    out: dict[str, dict[str, Any]] = defaultdict(dict)

    def hist(name: str, key: str, **match) -> dict[str, list]:
        by: dict[str, list] = defaultdict(list)
        for labels, value in samples.get(name + "_bucket", []):
            if all(labels.get(k) == v for k, v in match.items()):
                by[labels[key]].append((float(labels["le"]), value))
        merged: dict[str, list] = {}
        for k, pairs in by.items():
            acc: dict[float, float] = defaultdict(float)
            for le, v in pairs:
                acc[le] += v
            merged[k] = sorted(acc.items())
        return merged

    for b, buckets in hist("orchestrator_queue_wait_seconds", "backend").items():
        out[b]["queue_wait_p50"], out[b]["queue_wait_p95"] = quantile(buckets, .5), quantile(buckets, .95)
    for b, buckets in hist("orchestrator_ttft_seconds", "backend").items():
        out[b]["ttft_p50"], out[b]["ttft_p95"] = quantile(buckets, .5), quantile(buckets, .95)
    for b, buckets in hist("orchestrator_generation_tokens_per_second", "backend").items():
        out[b]["tokens_per_second_p50"] = quantile(buckets, .5)
    tokens: dict[str, dict[str, float]] = defaultdict(lambda: {"hit": 0.0, "miss": 0.0})
    for labels, value in samples.get("orchestrator_prompt_tokens_total", []):
        tokens[labels["backend"]][labels["cache"]] += value
    for b, t in tokens.items():
        total = t["hit"] + t["miss"]
        out[b]["cache_hit_ratio"] = t["hit"] / total if total else math.nan
    for labels, value in samples.get("orchestrator_requests_total", []):
        out[labels["backend"]]["requests"] = out[labels["backend"]].get("requests", 0) + value
    g = out["gateway"]
    g["synthetic"] = sum(v for _, v in samples.get("orchestrator_synthetic_responses_total", []))
    g["rejections"] = sum(v for _, v in samples.get("orchestrator_rejections_total", []))
    g["disconnects"] = sum(v for _, v in samples.get("orchestrator_client_disconnects_total", []))
    return dict(out)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _secs(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}s"


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
            out.append(f"  {p['name']:<20} {p['statename']:<9} {p['description']}")
    health = fetch_health(config)
    g = config.gateway
    if health is None:
        out.append(f"gateway: not answering on {g.url}")
        return "\n".join(out)
    raw = _get(config, "/metrics", 3.0)
    figures = key_figures(raw.decode()) if raw else {}
    out.append(f"gateway: {g.url} {health['status']}, up {health['gateway']['uptime_seconds']:.0f}s")
    out.append(f"  {'backend':<12} {'state':<8} {'busy':>4}/{'slots':<5} {'queued':>6} {'restarts':>8}  last restart")
    for b in health["backends"]:
        out.append(f"  {b['name']:<12} {b['state']:<8} {b['busy']:>4}/{b['slots']:<5} {b['queued']:>6} "
                   f"{b.get('restarts', 0):>8}  {_ago(b.get('last_restart'))}")
        if b["state"] not in ("ready", "unknown") and b.get("last_error"):
            out.append(f"    why: {b['last_error']}" + (f" (log: {b['log']})" if b.get("log") else ""))
    out.append("since the gateway started:")
    out.append(f"  {'backend':<12} {'requests':>8} {'wait p50':>9} {'wait p95':>9} {'ttft p50':>9} {'ttft p95':>9} "
               f"{'cache hit':>9} {'tok/s p50':>9}")
    for b in health["backends"]:
        f = figures.get(b["name"], {})
        ratio = f.get("cache_hit_ratio", math.nan)
        tps = f.get("tokens_per_second_p50", math.nan)
        out.append(f"  {b['name']:<12} {f.get('requests', 0):>8.0f} {_secs(f.get('queue_wait_p50')):>9} "
                   f"{_secs(f.get('queue_wait_p95')):>9} {_secs(f.get('ttft_p50')):>9} {_secs(f.get('ttft_p95')):>9} "
                   f"{'-' if math.isnan(ratio) else f'{ratio:.0%}':>9} {'-' if math.isnan(tps) else f'{tps:.1f}':>9}")
    gw = figures.get("gateway", {})
    out.append(f"  answered by the gateway itself: {gw.get('synthetic', 0):.0f}; rejected: {gw.get('rejections', 0):.0f};"
               f" clients gone early: {gw.get('disconnects', 0):.0f}")
    return "\n".join(out)
