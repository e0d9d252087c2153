"""`orchestrator status`: what supervisord and the gateway say, in one terminal screen.

Every figure is one the raw metrics support: requests are counted per route
(main, background, synthetic and count_tokens apart), a percentile is the
histogram bucket bound that holds it ("<= 30 s": the true value is at most
that, and above the bound below), never a value interpolated between bounds,
and a mean is sum over count, which is exact.
"""

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

from ..config import Config
from . import status_format as fmt
from . import supervise
from .status_format import Bound

ROUTES = ("main", "background", "synthetic", "count_tokens")


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


# ---- figures from the raw metrics ------------------------------------------------------------

def bucket_bound(buckets: list[tuple[float, float]], q: float) -> Bound | None:
    """The smallest bucket bound `le` whose cumulative count reaches q of all observations
    (the bucket holding the nearest-rank q-quantile); None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    top = max((le for le, _ in buckets if not math.isinf(le)), default=0.0)
    rank = q * total
    for le, count in buckets:
        if count >= rank:
            return Bound(le, top)
    return Bound(math.inf, top)


def _samples(metrics_text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples


def key_figures(metrics_text: str) -> dict[str, Any]:
    """Since the gateway started, from its /metrics text:

    - "routes": per route, answered (200), errors by status (any other status but client_gone),
      client_gone; and per route the backends that answered;
    - "backends": per backend, requests by route, queue wait and TTFT p50/p95 as bucket bounds and
      their exact means, cache hit ratio, tokens/s p50 as a bucket bound, restarts;
    - "rejections" and "disconnects" by reason and stage, "synthetic" by kind.
    """
    samples = _samples(metrics_text)

    routes: dict[str, dict[str, Any]] = {r: {"answered": 0.0, "errors": {}, "client_gone": 0.0, "by_backend": {}}
                                         for r in ROUTES}
    backends: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": {}})
    for labels, value in samples.get("orchestrator_requests_total", []):
        route, backend, status = labels["route"], labels["backend"], labels["status"]
        r = routes.setdefault(route, {"answered": 0.0, "errors": {}, "client_gone": 0.0, "by_backend": {}})
        if status == "200":
            r["answered"] += value
        elif status == "client_gone":
            r["client_gone"] += value
        else:
            r["errors"][status] = r["errors"].get(status, 0.0) + value
        r["by_backend"][backend] = r["by_backend"].get(backend, 0.0) + value
        reqs = backends[backend]["requests"]
        reqs[route] = reqs.get(route, 0.0) + value
    for r in routes.values():
        r["total"] = r["answered"] + r["client_gone"] + sum(r["errors"].values())

    def hist(name: str) -> dict[str, tuple[list[tuple[float, float]], float, float]]:
        """Per backend, merged over the other labels: (cumulative buckets, sum, count)."""
        acc: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        for labels, value in samples.get(name + "_bucket", []):
            acc[labels["backend"]][float(labels["le"])] += value
        for labels, value in samples.get(name + "_sum", []):
            sums[labels["backend"]] += value
        for labels, value in samples.get(name + "_count", []):
            counts[labels["backend"]] += value
        return {b: (sorted(pairs.items()), sums[b], counts[b]) for b, pairs in acc.items()}

    for key, name in (("queue_wait", "orchestrator_queue_wait_seconds"), ("ttft", "orchestrator_ttft_seconds"),
                      ("tokens_per_second", "orchestrator_generation_tokens_per_second")):
        for b, (buckets, total, count) in hist(name).items():
            f = backends[b]
            f[f"{key}_count"] = count
            f[f"{key}_p50"], f[f"{key}_p95"] = bucket_bound(buckets, .5), bucket_bound(buckets, .95)
            f[f"{key}_mean"] = total / count if count else None

    tokens: dict[str, dict[str, float]] = defaultdict(lambda: {"hit": 0.0, "miss": 0.0})
    for labels, value in samples.get("orchestrator_prompt_tokens_total", []):
        tokens[labels["backend"]][labels["cache"]] += value
    for b, t in tokens.items():
        total = t["hit"] + t["miss"]
        backends[b]["cache_hit_ratio"] = t["hit"] / total if total else None
    for labels, value in samples.get("orchestrator_backend_restarts_total", []):
        backends[labels["backend"]]["restarts"] = value

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in samples.get(name, []):
            out[labels[label]] = out.get(labels[label], 0.0) + value
        return out

    return {"routes": routes, "backends": dict(backends),
            "rejections": by("orchestrator_rejections_total", "reason"),
            "disconnects": by("orchestrator_client_disconnects_total", "stage"),
            "synthetic": by("orchestrator_synthetic_responses_total", "kind"),
            "background_answers": by("orchestrator_background_answers_total", "result"),
            "affinity": by("orchestrator_affinity_decisions_total", "decision"),
            "reasons": _reasons(samples)}


def _reasons(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, dict[str, float]]:
    """Per route, its requests by why they went there (routing.Reason), the ones seen only."""
    out: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("orchestrator_routes_total", []):
        if value:
            out.setdefault(labels["route"], {})[labels["reason"]] = value
    return out


def recent_lines(health: dict[str, Any], now: float) -> list[str]:
    """What happened recently, from /health: each backend's last restart (when, how many in all,
    how long until it was ready again) and any backend not ready now; most recent first."""
    events = []
    for b in health.get("backends", []):
        name, state, since = b["name"], b.get("state", "unknown"), b.get("since")
        error = b.get("last_error") or ""
        restarts, last = b.get("restarts") or 0, b.get("last_restart")
        parts = []
        if last:
            parts.append(f"{name} restarted at {fmt.clock(last, now)} "
                         f"({restarts} restart{'s' if restarts != 1 else ''} in all)")
            if state == "ready":
                if since and since >= last:
                    parts.append(f"ready again {fmt.span(since - last)} later, at {fmt.clock(since, now)}")
                else:
                    parts.append("ready at every health check since")
        if state not in ("ready", "unknown"):
            what = f"{state} since {fmt.clock(since, now)} ({fmt.span(now - since)} so far)" if since else state
            parts.append(what if last else f"{name} {what}")
        if not parts:
            continue
        line = ", ".join(parts)
        if error and (last or state not in ("ready", "unknown")):
            line += f"; last error: {error}"
        down_since = since if state not in ("ready", "unknown") and since else 0
        events.append((max(last or 0, down_since), line))
    if not events:
        return ["recent: no restarts; every backend up"]
    return [f"recent: {line}" for _, line in sorted(events, key=lambda e: -e[0])]


def status_text(url: str, socket: str, procs: list[dict[str, Any]] | None, health: dict[str, Any] | None,
                metrics_text: str | None, now: float | None = None) -> str:
    """The status screen from what supervisord, /health and /metrics answered (None: no answer)."""
    now = time.time() if now is None else now
    out = []
    if procs is None:
        out.append(f"supervisord: not running (no answer on {socket})")
    else:
        out.append("programs (supervisord):")
        for p in procs:
            out.append(f"  {p['name']:<20} {p['statename']:<9} {p['description']}")
    if health is None:
        out.append(f"gateway: not answering on {url}")
        return "\n".join(out)
    figures = key_figures(metrics_text) if metrics_text else None
    out.append(f"gateway: {url} {health['status']}, up {health['gateway']['uptime_seconds']:.0f}s")
    out.append(f"  {'backend':<12} {'state':<8} {'busy':>4}/{'slots':<5} {'queued':>6} {'restarts':>8}  last restart")
    for b in health["backends"]:
        out.append(f"  {b['name']:<12} {b['state']:<8} {b['busy']:>4}/{b['slots']:<5} {b['queued']:>6} "
                   f"{b.get('restarts', 0):>8}  {fmt.ago(b.get('last_restart'), now)}")
        if b["state"] not in ("ready", "unknown") and b.get("last_error"):
            out.append(f"    why: {b['last_error']}" + (f" (log: {b['log']})" if b.get("log") else ""))
    out.extend(recent_lines(health, now))
    out.extend(kv_lines(health, now))
    out.extend(pool_lines(health, figures))
    out.extend(agent_lines(health, figures))
    if figures is None:
        out.append("figures: /metrics did not answer")
        return "\n".join(out)

    out.append("requests since the gateway started, by route:")
    out.append(f"  {'route':<13} {'answered':>8} {'errors':>6} {'client gone':>11}  detail")
    for route, r in figures["routes"].items():
        detail = []
        if r["errors"]:
            detail.append("errors " + ", ".join(f"{s} x{fmt.num(n)}" for s, n in sorted(r["errors"].items())))
        answers = figures.get("background_answers", {})
        if route == "background" and any(answers.values()):
            made = answers.get("model", 0)
            replaced = {k: v for k, v in answers.items() if k != "model"}
            detail.append(f"titles/topics by the model {fmt.num(made)}"
                          + (f", replaced by the gateway's: {fmt.counts(replaced)}" if any(replaced.values()) else ""))
        if route == "synthetic" and any(figures["synthetic"].values()):
            detail.append(fmt.counts(figures["synthetic"]))
        if route == "count_tokens" and r["total"]:
            detail.append("counted by " + fmt.counts(r["by_backend"]))
        out.append(f"  {route:<13} {fmt.num(r['answered']):>8} {fmt.num(sum(r['errors'].values())):>6} "
                   f"{fmt.num(r['client_gone']):>11}  {'; '.join(detail)}".rstrip())
    rejections = fmt.counts(figures["rejections"])
    if rejections:
        out.append(f"  rejected by the gateway: {rejections}")
    gone = figures["disconnects"]
    if any(gone.values()):
        out.append(f"  clients gone early: {fmt.num(gone.get('queued', 0))} while queued, "
                   f"{fmt.num(gone.get('in_slot', 0))} in a slot")

    out.append("per backend (p50/p95: the bound of the histogram bucket that holds it; means exact):")
    out.append(f"  {'backend':<12} {'main':>5} {'bg':>5} {'wait p50':>9} {'wait p95':>9} "
               f"{'ttft p50':>9} {'ttft p95':>9} {'ttft mean':>9} {'cache hit':>9} {'tok/s p50':>9}")
    for b in health["backends"]:
        f = figures["backends"].get(b["name"], {"requests": {}})
        reqs, mean, ratio = f["requests"], f.get("ttft_mean"), f.get("cache_hit_ratio")
        out.append(
            f"  {b['name']:<12} {fmt.num(reqs.get('main', 0)):>5} {fmt.num(reqs.get('background', 0)):>5} "
            f"{fmt.bound_seconds(f.get('queue_wait_p50')):>9} {fmt.bound_seconds(f.get('queue_wait_p95')):>9} "
            f"{fmt.bound_seconds(f.get('ttft_p50')):>9} {fmt.bound_seconds(f.get('ttft_p95')):>9} "
            f"{'-' if mean is None else fmt.duration(mean):>9} "
            f"{'-' if ratio is None else f'{ratio:.0%}':>9} {fmt.bound_plain(f.get('tokens_per_second_p50')):>9}")
    return "\n".join(out)


def render(config: Config, paths: supervise.StackPaths) -> str:
    try:
        procs = supervise.processes(paths) if paths.socket.exists() else None
    except (OSError, xmlrpc.client.Error):
        procs = None
    health = fetch_health(config)
    raw = _get(config, "/metrics", 3.0) if health is not None else None
    return status_text(config.gateway.url, str(paths.socket), procs, health, raw.decode() if raw else None)


def pool_lines(health: dict[str, Any], figures: dict[str, Any] | None) -> list[str]:
    """Conversation affinity in a pool, from /health and /metrics: where conversations live, and how
    often a request went back to its own backend."""
    pool = health.get("pool")
    if not pool:
        return []
    homes = ", ".join(f"{name} {n}" for name, n in sorted(pool.get("homes", {}).items()))
    line = f"pool: {pool.get('conversations', 0)} conversations" + (f" ({homes})" if homes else "")
    decisions = (figures or {}).get("affinity", {})
    if any(decisions.values()):
        moved = {k.removeprefix("moved_"): v for k, v in decisions.items() if k.startswith("moved_") and v}
        line += (f"; requests back to their own backend {fmt.num(decisions.get('hit', 0))}, "
                 f"new {fmt.num(decisions.get('new', 0))}, moved {fmt.num(sum(moved.values()))}"
                 + (f" ({fmt.counts(moved)})" if moved else ""))
    return [line]


def kv_lines(health: dict[str, Any], now: float) -> list[str]:
    """Each backend's last KV restore (what a restart cost in prefill), model cache and cache misses."""
    out = []
    for b in health.get("backends", []):
        r = b.get("kv_restore")
        if not r or r.get("result") == "none":  # nothing saved yet: nothing to say
            continue
        when = f"after the restart at {fmt.clock(r['time'], now)}" if r.get("time") else "after a restart"
        if r.get("result") == "restored":
            out.append(f"kv cache: {b['name']} restored {r.get('n_tokens', 0):,} tokens in {r.get('seconds', 0):.2f} s {when}")
        else:
            out.append(f"kv cache: {b['name']} started cold {when} ({r.get('result')}{': ' + r['error'] if r.get('error') else ''})")
    for b in health.get("backends", []):
        f = b.get("kv_folder")
        if f:  # its save folder (kv/folder.py): what it holds, and what keeps a save from being made
            free = f", {f['disk_free'] / 1e9:.1f} GB free on its disk" if f.get("disk_free") is not None else ""
            out.append(f"kv saves: {b['name']} {f['saves']:,} saves, {f['bytes'] / 1e9:.2f} of "
                       f"{f['max_bytes'] / 1e9:.2f} GB{free}"
                       + "".join(f"; {f[k]}" for k in ("problem", "budget") if f.get(k)))
        m, saves, cache = b.get("model_cache") or {}, b.get("kv_saves") or {}, b.get("cache") or {}
        off = saves.get("off_because") if not saves.get("on", True) and saves.get("off_because") != m.get("why") else ""
        if m:  # what its model's cache is, and whether its slot saves can pay off (kv/restorable.py)
            out.append(f"model cache: {b['name']} {m.get('line') or m['kind']}"
                       + (f"; slot saves off: {off} (what still works: {saves.get('instead')})" if off else ""))
        if cache.get("turns"):  # why turns missed the cache (cachemiss.py), and the last one
            last = (cache.get("recent") or [{}])[-1]
            at = f" at token {last['at_token']} ({last['at_block']})" if last.get("at_block") else ""
            out.append(f"prompt cache: {b['name']} turns {fmt.counts(cache['turns'])}; last {last.get('reason')}{at}, "
                       f"{last.get('cached', 0):,}/{last.get('prompt', 0):,} from cache")
    return out


def _node(n: dict[str, Any]) -> str:
    """One requester of the tree: what it has in flight and where, else when it was last seen."""
    where = f" on {n['backend']}" if n.get("backend") else ""
    if n.get("running"):
        state = f"running{where}" + (f", {n['queued']} more queued" if n.get("queued") else "")
    elif n.get("queued"):
        state = f"{n['queued']} queued"
    else:
        state = f"idle {fmt.span(n.get('idle_seconds') or 0)}" + (f" (last{where})" if where else "")
    return f"{state}; {n.get('requests', 0)} requests"


def agent_lines(health: dict[str, Any], figures: dict[str, Any] | None) -> list[str]:
    """Why requests went where they went (/metrics), and Claude Code's sessions and agents (/health):
    which are queued or running on which backend. Ids are the first 8 characters of Claude Code's."""
    out = []
    reasons = (figures or {}).get("reasons") or {}
    if reasons:
        out.append("why requests went where: " + "; ".join(
            f"{route} {fmt.counts(by)}" for route, by in sorted(reasons.items())))
    tree = health.get("agents")
    if not tree or not tree.get("sessions"):
        return out
    forgotten = f", {tree['forgotten']} forgotten" if tree.get("forgotten") else ""
    out.append(f"claude code sessions: {tree.get('sessions_known', 0)} known{forgotten} (newest first)")
    for s in tree["sessions"]:
        main = s.get("main")
        out.append(f"  session {s['id']}" + (f"  main: {_node(main)}" if main else "  main: not seen"))
        for a in s.get("agents", []):
            parent = f" (of agent {a['parent']})" if a.get("parent") else ""
            out.append(f"    agent {a['id']}{parent}: {_node(a)}")
    return out
