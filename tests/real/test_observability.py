"""Prometheus rules, the Grafana dashboard and compose file, and every panel's query on real data."""

import asyncio
import copy
import importlib.util
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from orchestrator.configfile import config_from_dict
from orchestrator.metrics import Metrics
from orchestrator.ops import grafana as dashboard
from orchestrator.ops import status as status_view
from orchestrator.ops import supervise
from testkit.client import sample
from testkit.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "grafana" / "dashboards" / "orchestrator.json"
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: deploy/ensure-tools.sh (run by make test) installs it"
    return path


def run(*cmd, cwd=None):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def dashboard_targets(board: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def as_promql(expr: str, rate_interval: str = "30s") -> str:
    """What Grafana would send: its variables substituted."""
    return expr.replace("$__rate_interval", rate_interval).replace("$backend", ".*")


# ---- static checks -----------------------------------------------------------------------------

def test_promtool_checks_rules_and_runs_their_unit_tests():
    run(tool("promtool"), "check", "rules", str(PROM_DIR / "rules.yml"))
    run(tool("promtool"), "test", "rules", "rules_test.yml", cwd=PROM_DIR)


def test_promtool_checks_every_prometheus_config(tmp_path):
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(supervise.render_prometheus(config_from_dict({"backends": [
        {"name": "primary", "url": "http://127.0.0.1:8080", "command": "x"},
        {"name": "remote", "url": "https://api.example.test"}]})))
    assert "api.example.test" not in rendered.read_text()
    run(tool("promtool"), "check", "config", str(rendered))
    compose_cfg = tmp_path / "compose.yml"
    compose_cfg.write_text((ROOT / "deploy" / "prometheus.yml").read_text()
                           .replace("/etc/prometheus/rules.yml", str(PROM_DIR / "rules.yml")))
    run(tool("promtool"), "check", "config", str(compose_cfg))


def test_dashboard_structure():
    board = json.loads(DASHBOARD.read_text())
    uid = re.search(r"uid:\s*(\S+)", DATASOURCE.read_text()).group(1)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert len(board["panels"]) >= 14
    for p in board["panels"]:
        assert p["targets"], p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), p["title"]
    exprs = " ".join(e for _, e in dashboard_targets(board))
    for needed in ("orchestrator_queue_wait_seconds", "orchestrator_ttft_seconds", "orchestrator_upstream_ttft",
                   "cache=\"hit\"", "orchestrator_generation_tokens_per_second", "orchestrator_requests_total",
                   "route=\"synthetic\"", "orchestrator_queue_depth", "orchestrator_slots_busy",
                   "orchestrator_backend_up", "orchestrator_backend_restarts_total", "orchestrator_rejections_total",
                   "orchestrator_client_disconnects_total", "orchestrator_kv_saves_total",
                   "orchestrator_kv_restores_total", "orchestrator_background_answers_total", "llamacpp:"):
        assert needed in exprs, needed


def test_every_dashboard_metric_is_declared():
    """Names used by the dashboard exist in metrics.py or llama-server's list, so a typo fails here too."""
    registry = CollectorRegistry()
    Metrics(registry, ["primary"])
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    declared = {f.name + sfx for f in registry.collect() for sfx in suffixes[f.type]}
    llama = {"llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:prompt_tokens_total",
             "llamacpp:prompt_tokens_cached_total", "llamacpp:prompt_tokens_seconds",
             "llamacpp:predicted_tokens_seconds"}
    for title, expr in dashboard_targets(json.loads(DASHBOARD.read_text())):
        for name in re.findall(r"(orchestrator_\w+|llamacpp:\w+)", expr):
            assert name in declared or name in llama, f"{title}: unknown metric {name}"


def test_compose_file_is_valid_for_the_real_compose_binary(tmp_path):
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose"
    assert binary.exists()
    run(str(binary), "-f", str(ROOT / "deploy" / "docker-compose.yml"), "config", "--quiet")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "deploy" / "docker-compose.yml").read_text().replace("network_mode: host",
                                                                                 "network_mode: [host]", 1))
    out = subprocess.run([str(binary), "-f", str(broken), "config", "--quiet"], capture_output=True)
    assert out.returncode != 0  # the binary, unlike its Python shim, does fail


def test_grafana_container_spec_and_no_engine_path(monkeypatch):
    spec = dashboard.grafana_container_spec("http://127.0.0.1:9091")
    assert spec["image"].startswith("grafana/grafana:") and spec["network_mode"] == "host"
    assert spec["environment"]["PROMETHEUS_URL"] == "http://127.0.0.1:9091"
    assert spec["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    binds = {v["bind"]: Path(k) for k, v in spec["volumes"].items()}
    assert (binds["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").exists()
    assert (binds["/var/lib/grafana/dashboards"] / "orchestrator.json").exists()
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(dashboard.NoDockerEngine):
        dashboard.start_grafana("http://127.0.0.1:9091")


def test_dashboard_command_says_no_engine_in_one_line(monkeypatch):
    from click.testing import CliRunner

    from orchestrator.ops.cli import main

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = CliRunner().invoke(main, ["dashboard", "--grafana", "--config", str(ROOT / "deploy" / "orchestrator.toml")])
    assert result.exit_code == 1
    page, no_engine = result.output.splitlines()
    assert page == "Dashboard: http://127.0.0.1:9090/dashboard" and "orchestrator status" in no_engine


# ---- real Prometheus scraping the real gateway and llama-server --------------------------------

class Prometheus:
    def __init__(self, tmp: Path, config_text: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(config_text)
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen([tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def finite(self, promql: str) -> list:
        return [s for s in self.query(promql) if math.isfinite(float(s["value"][1]))]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.real
async def test_every_panel_query_returns_data_from_real_traffic(llama, llama_small, gateway, http, tmp_path):
    # KV saving on (this llama-server has no --slot-save-path: its saves fail, and are counted);
    # real saves and restores are measured in test_kvsave_real. A second real server is the background model.
    small = {"name": "small", "url": llama_small.url, "role": "background"}
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url, "kv_save_dir": str(tmp_path),
                                             "kv_save_idle_seconds": 0}, small],
                               "routing": {"background": "small"}})
    host_port = base.removeprefix("http://")
    config = config_from_dict({"gateway": {"host": "127.0.0.1", "port": int(host_port.split(":")[1])},
                               "backends": [{"name": "primary", "url": llama.url}, small],
                               "routing": {"background": "small"},
                               "supervisor": {"prometheus_scrape_interval": "1s"}})
    prom = Prometheus(tmp_path, supervise.render_prometheus(config))
    try:
        # Traffic of every route: main (stream and not), synthetic, count_tokens, a rejection, a disconnect.
        main = copy.deepcopy(sample("main-2.1.332.json")["body"])
        main["tools"], main["max_tokens"] = main["tools"][:2], 12
        for stream in (True, False, True):
            async with http.post(base + "/v1/messages?beta=true", json={**main, "stream": stream}) as r:
                assert r.status == 200
                await r.read()
        for name in ("title-2.1.332.json", "topic-2.0.77.json", "warmup-2.0.77.json", "count-probe-2.1.197.json"):
            async with http.post(base + "/v1/messages?beta=true", json=sample(name)["body"]) as r:
                assert r.status == 200
        for _ in range(3):
            async with http.post(base + "/v1/messages/count_tokens?beta=true",
                                 json=sample("count_tokens-2.1.197.json")["body"]) as r:
                assert r.status == 200
        async with http.post(base + "/v1/messages", data=b"{bad", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/messages", json={"model": "m", "max_tokens": 300, "stream": True,
                                                            "messages": [{"role": "user", "content": "A story"}]}) as r:
                await r.content.readany()
        await asyncio.sleep(4)  # several 1 s scrapes after the traffic

        deadline = time.time() + 30
        while time.time() < deadline and len(prom.query('up{job="llama-server"} == 1')) < 2:
            await asyncio.sleep(0.5)
        board = json.loads(DASHBOARD.read_text())

        def empty_panels() -> list:
            return [(title, expr) for title, expr in dashboard_targets(board) if not prom.finite(as_promql(expr))]

        # The 4 s above are 4 scrapes on an idle machine; a loaded one may scrape later: waited for,
        # up to 60 s, so a panel fails for having no series, not for a late scrape.
        deadline = time.time() + 60
        while (empty := empty_panels()) and time.time() < deadline:
            await asyncio.sleep(1)
        assert not empty, f"panels with no data: {empty}"
        # Series start at zero, so "data" alone is no proof for counters: the background model's
        # title and topic answers were counted as its own.
        made = prom.query('sum by (shape) (orchestrator_background_answers_total{result="model"}) > 0')
        assert {m["metric"]["shape"] for m in made} == {"title", "topic"}, made
        # The background panel on a stack without that backend (the default one): the gateway's own answers.
        expr = next(e for _, e in dashboard_targets(board) if "orchestrator_background_answers_total" in e)
        alone = prom.query(as_promql(expr).replace('backend=~".*"', 'backend=~"no-such-backend"'))
        assert {(m["metric"]["shape"], m["metric"]["result"]) for m in alone} == \
            {("title", "synthetic"), ("topic", "synthetic")}, alone

        # The recording rules produce series too.
        records = re.findall(r"record:\s*(\S+)", (PROM_DIR / "rules.yml").read_text())
        assert records and all(prom.query(r) for r in records), records

        # A misspelled metric name is caught by the same check.
        title, expr = dashboard_targets(board)[4]
        assert not prom.finite(as_promql(expr.replace("orchestrator_queue_wait", "orchestrator_queue_wiat")))

        # The terminal view shows the same key figures.
        view = await asyncio.to_thread(status_view.render, config, supervise.StackPaths(tmp_path))
        assert "primary" in view and "cache hit" in view
    finally:
        prom.stop()


def test_the_background_panel_shows_synthetic_answers_on_a_stack_without_a_background_model():
    """The default stack has no background backend, so no orchestrator_background_answers series: the
    panel's one query falls back to the gateway's own title and topic answers (their series exist
    from the start), so no target of it is empty there. Its data on real traffic is checked above."""
    board = json.loads(DASHBOARD.read_text())
    panel = next(p for p in board["panels"] if "orchestrator_background_answers_total" in p["targets"][0]["expr"])
    [target] = panel["targets"]
    model, synthetic = target["expr"].split(" or ")
    assert "orchestrator_background_answers_total" in model and "$backend" in model
    assert 'orchestrator_synthetic_responses_total{kind=~"title|topic"}' in synthetic and "$backend" not in synthetic
    from prometheus_client import CollectorRegistry

    from orchestrator.metrics import Metrics
    metrics = Metrics(CollectorRegistry(), ["primary"])
    names = {s.labels.get("kind") for f in metrics.registry.collect() for s in f.samples
             if s.name == "orchestrator_synthetic_responses_total"}
    assert {"title", "topic"} <= names
