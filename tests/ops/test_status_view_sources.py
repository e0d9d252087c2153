"""`orchestrator status` beyond the known history of test_status_view: the view with no traffic, render()
reading a gateway's /health and /metrics, a live gateway's figures against its metrics, a pool's line and
the agent tree."""

import json

from prometheus_client import CollectorRegistry, generate_latest
from test_status_view import backend_row, history, parse_raw, raw_sum, route_rows, view_of  # noqa: F401 (fixture)

from orchestrator.configfile import config_from_dict
from orchestrator.metrics import Metrics
from orchestrator.ops import status as status_view
from orchestrator.ops import supervise


def test_without_traffic_the_view_shows_dashes_not_zeros():
    health = {"status": "ok", "gateway": {"uptime_seconds": 1.0},
              "backends": [{"name": "primary", "state": "ready", "since": 1.0, "last_error": "", "slots": 1,
                            "busy": 0, "queued": 0, "restarts": 0, "last_restart": None}]}
    text = generate_latest(Metrics(CollectorRegistry(), ["primary"]).registry).decode()
    view = status_view.status_text("http://g", "/s", None, health, text, now=10.0)
    row = backend_row(view, "primary")
    assert [row[k] for k in ("wait_p50", "ttft_p95", "ttft_mean", "cache_hit", "tps_p50")] == ["-"] * 5
    assert all(r["answered"] == r["errors"] == r["client_gone"] == 0 for r in route_rows(view).values())
    assert "recent: no restarts; every backend up" in view
    assert "rejected" not in view and "clients gone" not in view


def test_render_reads_health_and_metrics_from_the_gateway(history, monkeypatch, tmp_path):
    text, health, _ = history
    answers = {"/health": json.dumps(health).encode(), "/metrics": text.encode()}
    monkeypatch.setattr(status_view, "_get", lambda config, path, timeout: answers.get(path))
    config = config_from_dict({"backends": [{"name": "primary", "url": "http://127.0.0.1:8080"}]})
    paths = supervise.StackPaths(tmp_path)
    view = status_view.render(config, paths)
    assert f"supervisord: not running (no answer on {paths.socket})" in view
    assert route_rows(view) == route_rows(view_of(history))
    assert backend_row(view, "primary") == backend_row(view_of(history), "primary")
    assert "recent: primary restarted at 2025-01-03 14:02:07" in view  # another day: with its date

    answers.pop("/metrics")
    assert "figures: /metrics did not answer" in status_view.render(config, paths)
    answers.pop("/health")
    assert "gateway: not answering on" in status_view.render(config, paths)


async def test_a_live_gateway_status_agrees_with_its_metrics(gateway, fake, http):
    """Real traffic through the real gateway: main, synthetic, count_tokens and a bad request."""
    from conftest import gateway_with
    from testkit.client import sample

    _, url = fake
    base, _ = await gateway_with(gateway, url)
    for _ in range(2):
        async with http.post(base + "/v1/messages", json={
                "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            await r.read()
    async with http.post(base + "/v1/messages?beta=true", json=sample("warmup-2.0.77.json")["body"]) as r:
        assert r.status == 200
    for _ in range(3):
        async with http.post(base + "/v1/messages/count_tokens?beta=true",
                             json=sample("count_tokens-2.1.197.json")["body"]) as r:
            assert r.status == 200
    async with http.post(base + "/v1/messages", data=b"{bad", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    async with http.get(base + "/health") as r:
        health = await r.json()
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    raw = parse_raw(text)
    view = status_view.status_text(base, "/s", None, health, text)
    rows = route_rows(view)
    assert (rows["main"]["answered"], rows["main"]["errors"]) == (2, 1)
    assert rows["main"]["by_status"] == {"400": 1}
    assert rows["synthetic"]["answered"] == 1 and rows["count_tokens"]["answered"] == 3
    for route, row in rows.items():
        assert row["answered"] + row["errors"] + row["client_gone"] == raw_sum(
            raw, "orchestrator_requests_total", route=route)
    assert int(backend_row(view, "primary")["main"]) == 2


def test_a_pool_shows_where_conversations_live_and_how_requests_were_placed():
    m = Metrics(CollectorRegistry(), ["a", "b"])
    for b in ("a", "b"):
        m.add_pool_backend(b)
    m.affinity.labels("a", "hit").inc(7)
    m.affinity.labels("b", "hit").inc(5)
    m.affinity.labels("b", "new").inc(2)
    m.affinity.labels("b", "moved_down").inc(1)
    health = {"status": "ok", "gateway": {"version": "0", "uptime_seconds": 10.0}, "backends": [],
              "pool": {"conversations": 3, "homes": {"a": 1, "b": 2}}}
    view = status_view.status_text("http://127.0.0.1:9090", "/run/s.sock", None, health,
                                   generate_latest(m.registry).decode(), now=0)
    line = next(ln for ln in view.splitlines() if ln.startswith("pool:"))
    assert line == ("pool: 3 conversations (a 1, b 2); requests back to their own backend 12, new 2, "
                    "moved 1 (down 1)")
    no_pool = {**health}
    del no_pool["pool"]
    assert "pool:" not in status_view.status_text("u", "s", None, no_pool, None, now=0)


def test_the_agent_tree_and_why_requests_went_where_they_went():
    m = Metrics(CollectorRegistry(), ["primary"])
    m.routes.labels("main", "work").inc(4)
    m.routes.labels("main", "background_name_work").inc(2)
    m.routes.labels("synthetic", "warmup").inc(3)
    node = {"parent": None, "queued": 0, "running": 0, "requests": 4, "backend": "primary", "idle_seconds": 12.0}
    tree = {"sessions_known": 1, "forgotten": 2, "sessions": [{"id": "295830f4", "main": {**node, "running": 1},
            "agents": [{**node, "id": "a7c34fb6", "queued": 1, "requests": 1, "backend": None},
                       {**node, "id": "a5c14542", "parent": "a7c34fb6", "requests": 2}]}]}
    health = {"status": "ok", "gateway": {"version": "0", "uptime_seconds": 10.0}, "backends": [], "agents": tree}
    view = status_view.status_text("u", "s", None, health, generate_latest(m.registry).decode(), now=0)
    lines = view.splitlines()
    start = lines.index("claude code sessions: 1 known, 2 forgotten (newest first)")
    assert lines[start + 1:start + 4] == [
        "  session 295830f4  main: running on primary; 4 requests",
        "    agent a7c34fb6: 1 queued; 1 requests",
        "    agent a5c14542 (of agent a7c34fb6): idle 12 s (last on primary); 2 requests"]
    assert "why requests went where: main work 4, background_name_work 2; synthetic warmup 3" in lines
    quiet = {**health, "agents": {"sessions_known": 0, "sessions": []}}
    assert "claude code sessions" not in status_view.status_text("u", "s", None, quiet, None, now=0)
