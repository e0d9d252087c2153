"""`orchestrator status`: every figure it prints agrees with the raw metrics.

The metrics come from the project's own Metrics class on a fresh registry, the
health from real BackendHealth objects; the raw exposition text is parsed here
independently of status_view, and each printed figure is checked against it.
The view without traffic, from a live gateway, a pool's and the agent tree's lines:
test_status_view_sources.
"""

import math
import re
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.backends import health as health_module
from orchestrator.backends.health import BackendHealth, ProcessWatch, State
from orchestrator.config import BackendConfig
from orchestrator.engines.llama_server import LlamaServer
from orchestrator.engines.upstream import UpstreamClient
from orchestrator.metrics import (
    LATENCY_BUCKETS,
    ROUTES,
    TOKENS_PER_SECOND_BUCKETS,
    Metrics,
)
from orchestrator.ops import status as status_view
from orchestrator.slots import SlotQueue

# ---- the raw exposition, parsed here without prometheus_client or status_view ------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_raw(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        out.append((m[1], dict(LABEL.findall(m[2] or "")), float(m[3])))
    return out


def raw_sum(raw, name: str, **match) -> float:
    return sum(v for n, labels, v in raw if n == name and all(labels.get(k) == w for k, w in match.items()))


def raw_buckets(raw, name: str, backend: str) -> list[tuple[float, float]]:
    acc: dict[float, float] = {}
    for n, labels, v in raw:
        if n == name + "_bucket" and labels["backend"] == backend:
            le = float(labels["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile of the real samples: the ceil(q*n)-th smallest."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def bucket_of(value: float, bounds) -> float:
    """The bound of the bucket a value is counted in (Prometheus: value <= le)."""
    return next((le for le in bounds if value <= le), math.inf)


# ---- the printed view, parsed ------------------------------------------------------------------

TOKEN = re.compile(r"(?:<=|>) [\d.]+(?: (?:ms|s))?|[\d.]+ (?:ms|s)|\S+")


def seconds(text: str) -> float:
    number, unit = text.split()
    return float(number) / 1000 if unit == "ms" else float(number)


def parse_bound(text: str) -> tuple[str, float]:
    """'<= 25 ms' -> ('<=', 0.025); '> 1200 s' -> ('>', 1200.0); '<= 35' -> ('<=', 35.0)."""
    op, rest = text.split(" ", 1)
    return op, seconds(rest) if rest.endswith("s") else float(rest)


def route_rows(view: str) -> dict[str, dict]:
    rows = {}
    for line in view.splitlines():
        m = re.match(r"^  (main|background|synthetic|count_tokens)\s+(\d+)\s+(\d+)\s+(\d+)(?:\s+(.*))?$", line)
        if m:
            errors = {}
            detail = m[5] or ""
            if detail.startswith("errors "):
                errors = {s: int(n) for s, n in re.findall(r"(\w+) x(\d+)", detail.split(";")[0])}
            rows[m[1]] = {"answered": int(m[2]), "errors": int(m[3]), "client_gone": int(m[4]),
                          "by_status": errors, "detail": detail}
    return rows


def backend_row(view: str, name: str) -> dict:
    lines = view.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["backend", "main", "bg"])
    line = next(line for line in lines[start + 1:] if line.startswith(f"  {name} "))
    t = TOKEN.findall(line)
    keys = ("name", "main", "bg", "wait_p50", "wait_p95", "ttft_p50", "ttft_p95", "ttft_mean", "cache_hit", "tps_p50")
    assert len(t) == len(keys), t
    return dict(zip(keys, t))


def health_row(view: str, name: str) -> list[str]:
    lines = view.splitlines()
    start = next(i for i, line in enumerate(lines) if "busy/slots" in line.replace(" ", ""))
    return next(line.split() for line in lines[start + 1:] if line.startswith(f"  {name} "))


def assert_mean(printed: str, exact: float) -> None:
    """A printed mean is the exact one, rounded to the digits it shows."""
    number, unit = printed.split()
    decimals = len(number.partition(".")[2])
    scale = 1000 if unit == "ms" else 1
    assert abs(float(number) - exact * scale) <= 0.5 * 10 ** -decimals + 1e-9, (printed, exact)


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


# ---- a known history ---------------------------------------------------------------------------

TTFT_PRIMARY = [0.2, 3, 207]            # the case: the real p95 is 207 s
TTFT_SMALL = [0.05, 1500]               # past the largest finite bound
WAIT_PRIMARY = [0.0004, 0.01, 25]
TPS_PRIMARY = [12, 30, 80]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


@pytest.fixture
def history(monkeypatch):
    """Metrics and /health after a known history; (raw metrics text, health dict, now)."""
    clock_ = Clock(time.mktime((2025, 1, 3, 14, 0, 0, 0, 0, -1)))
    monkeypatch.setattr(health_module, "time", SimpleNamespace(time=clock_.time))
    m = Metrics(CollectorRegistry(), ["primary", "small"])

    for v in TTFT_PRIMARY:
        m.ttft.labels("primary", "main").observe(v)
    for v in TTFT_SMALL:
        m.ttft.labels("small", "background").observe(v)
    for v in WAIT_PRIMARY:
        m.queue_wait.labels("primary", "main").observe(v)
    for v in TPS_PRIMARY:
        m.tokens_per_second.labels("primary").observe(v)
    m.ttft.labels("gateway", "synthetic").observe(0.001)
    m.prompt_tokens.labels("primary", "hit").inc(24_000)
    m.prompt_tokens.labels("primary", "miss").inc(6_100)

    m.requests.labels("main", "primary", "200").inc(3)
    m.requests.labels("main", "primary", "529").inc(2)
    m.requests.labels("main", "primary", "stream_error").inc(1)
    m.requests.labels("main", "primary", "client_gone").inc(1)
    m.requests.labels("main", "none", "400").inc(1)            # refused before routing
    m.requests.labels("background", "small", "200").inc(2)
    m.add_background_backend("small")
    m.background_answers.labels("small", "title", "model").inc(2)
    m.background_answers.labels("small", "topic", "timeout").inc(1)
    m.requests.labels("synthetic", "gateway", "200").inc(4)
    m.synthetic.labels("title").inc(3)
    m.synthetic.labels("warmup").inc(1)
    m.requests.labels("count_tokens", "primary", "200").inc(25)  # /context's burst
    m.requests.labels("count_tokens", "estimate", "200").inc(5)
    m.rejections.labels("queue_full").inc(2)
    m.rejections.labels("bad_request").inc(1)
    m.disconnects.labels("in_slot").inc(1)

    # primary: running, crashes at 14:02:00, supervisord starts pid 101 at 14:02:07,
    # it loads its model and answers /health again at 14:02:45.
    primary = BackendHealth(LlamaServer(BackendConfig(name="primary", url="http://127.0.0.1:8080", command="x"),
                                        UpstreamClient()), SlotQueue("primary", 1), metrics=m,
                            watch=ProcessWatch("/run/s.sock", "llama-primary", "var/log/llama-primary.log"))
    primary.observe_process("RUNNING", 100)
    primary.set(State.READY)
    clock_.t += 120
    primary.observe_process("EXITED", 100)
    clock_.t += 7
    primary.observe_process("STARTING", 101)
    clock_.t += 1
    primary.set(State.LOADING, "loading model (HTTP 503)")
    clock_.t += 37
    primary.set(State.READY)
    # small: refuses connections since 14:10:00.
    small = BackendHealth(LlamaServer(BackendConfig(name="small", url="http://127.0.0.1:8081", role="background"),
                                      UpstreamClient()), SlotQueue("small", 1))
    small.set(State.READY)
    clock_.t = primary.since + 435
    small.mark_down("connection refused")
    clock_.t += 90
    health = {"status": "ok", "gateway": {"version": "0", "uptime_seconds": 3600.0},
              "backends": [primary.snapshot(), small.snapshot()]}
    return generate_latest(m.registry).decode(), health, clock_.t


def view_of(history) -> str:
    text, health, now = history
    return status_view.status_text("http://127.0.0.1:9090", "/run/s.sock", None, health, text, now=now)


# ---- the tests ---------------------------------------------------------------------------------

def test_routes_are_counted_apart_and_agree_with_the_raw_metrics(history):
    raw = parse_raw(history[0])
    view = view_of(history)
    rows = route_rows(view)
    assert list(rows) == list(ROUTES)
    for route, row in rows.items():
        statuses = {labels["status"] for n, labels, _ in raw
                    if n == "orchestrator_requests_total" and labels["route"] == route}
        assert row["answered"] == raw_sum(raw, "orchestrator_requests_total", route=route, status="200")
        assert row["client_gone"] == raw_sum(raw, "orchestrator_requests_total", route=route, status="client_gone")
        errors = {s: raw_sum(raw, "orchestrator_requests_total", route=route, status=s)
                  for s in statuses - {"200", "client_gone"}}
        errors = {s: n for s, n in errors.items() if n}
        assert row["errors"] == sum(errors.values())
        assert row["by_status"] == errors
    # count_tokens is its own row, never in main's figures.
    count_tokens = raw_sum(raw, "orchestrator_requests_total", route="count_tokens")
    assert count_tokens == 30 and rows["count_tokens"]["answered"] == 30
    main_total = rows["main"]["answered"] + rows["main"]["errors"] + rows["main"]["client_gone"]
    assert main_total == raw_sum(raw, "orchestrator_requests_total", route="main") == 8
    assert rows["main"]["answered"] == 3
    assert "counted by primary 25, estimate 5" in rows["count_tokens"]["detail"]
    assert "title 3, warmup 1" in rows["synthetic"]["detail"]
    # The background model's titles and topics: made by it, or replaced by the gateway's.
    assert rows["background"]["detail"] == "titles/topics by the model 2, replaced by the gateway's: timeout 1"
    assert rows["background"]["answered"] == raw_sum(raw, "orchestrator_background_answers_total", result="model")
    assert rows["synthetic"]["answered"] == raw_sum(raw, "orchestrator_synthetic_responses_total")
    # Per backend, only the requests that took its slot: count_tokens' 25 on primary are not there.
    for name in ("primary", "small"):
        row = backend_row(view, name)
        assert int(row["main"]) == raw_sum(raw, "orchestrator_requests_total", route="main", backend=name)
        assert int(row["bg"]) == raw_sum(raw, "orchestrator_requests_total", route="background", backend=name)
    assert backend_row(view, "primary")["main"] == "7"


def test_rejections_and_disconnects_by_reason(history):
    raw = parse_raw(history[0])
    view = view_of(history)
    line = next(line for line in view.splitlines() if "rejected by the gateway:" in line)
    printed = {k: float(v) for k, v in re.findall(r"(\w+) (\d+)", line.split(":", 1)[1])}
    expected = {labels["reason"]: v for n, labels, v in raw if n == "orchestrator_rejections_total" and v}
    assert printed == expected == {"queue_full": 2, "bad_request": 1}
    line = next(line for line in view.splitlines() if "clients gone early:" in line)
    queued, in_slot = map(float, re.findall(r"(\d+) (?:while queued|in a slot)", line))
    assert queued == raw_sum(raw, "orchestrator_client_disconnects_total", stage="queued")
    assert in_slot == raw_sum(raw, "orchestrator_client_disconnects_total", stage="in_slot")


def test_percentiles_are_the_bucket_bounds_that_hold_the_real_ones(history):
    raw = parse_raw(history[0])
    view = view_of(history)
    cases = [("primary", "ttft", "orchestrator_ttft_seconds", TTFT_PRIMARY, LATENCY_BUCKETS),
             ("small", "ttft", "orchestrator_ttft_seconds", TTFT_SMALL, LATENCY_BUCKETS),
             ("primary", "wait", "orchestrator_queue_wait_seconds", WAIT_PRIMARY, LATENCY_BUCKETS),
             ("primary", "tps", "orchestrator_generation_tokens_per_second", TPS_PRIMARY,
              TOKENS_PER_SECOND_BUCKETS)]
    for backend, key, metric, values, bounds in cases:
        row = backend_row(view, backend)
        les = [le for le, _ in raw_buckets(raw, metric, backend)]
        finite = [le for le in les if not math.isinf(le)]
        assert finite == [float(b) for b in bounds]
        for q, col in ((.5, f"{key}_p50"), (.95, f"{key}_p95")):
            if col not in row:
                continue
            op, printed = parse_bound(row[col])
            truth = nearest_rank(values, q)
            holder = bucket_of(truth, finite)
            if math.isinf(holder):
                # Past the largest finite bound: "> 1200 s", nothing invented beyond it.
                assert (op, printed) == (">", max(finite)) and truth > max(finite)
            else:
                # Exactly a bound from the exposition, the one whose bucket holds the real quantile.
                assert op == "<=" and printed in les and printed == holder
                below = max((le for le in finite if le < holder), default=0.0)
                assert below < truth <= printed
    # The case: the real p95 TTFT is 207 s; the view says "<= 300 s", never 264.
    primary = backend_row(view, "primary")
    assert primary["ttft_p95"] == "<= 300 s" and primary["ttft_p50"] == "<= 5 s"
    assert backend_row(view, "small")["ttft_p95"] == "> 1200 s"
    assert "264" not in view


def test_means_and_cache_hit_are_exact(history):
    raw = parse_raw(history[0])
    view = view_of(history)
    for backend in ("primary", "small"):
        row = backend_row(view, backend)
        total = raw_sum(raw, "orchestrator_ttft_seconds_sum", backend=backend)
        count = raw_sum(raw, "orchestrator_ttft_seconds_count", backend=backend)
        assert_mean(row["ttft_mean"], total / count)
    assert backend_row(view, "primary")["ttft_mean"] == "70.1 s"
    hit = raw_sum(raw, "orchestrator_prompt_tokens_total", backend="primary", cache="hit")
    miss = raw_sum(raw, "orchestrator_prompt_tokens_total", backend="primary", cache="miss")
    assert backend_row(view, "primary")["cache_hit"] == f"{round(100 * hit / (hit + miss))}%" == "80%"
    assert backend_row(view, "small")["cache_hit"] == "-"  # no prompt tokens yet: no ratio


def test_restarts_and_what_happened_recently(history):
    text, health, now = history
    raw = parse_raw(text)
    view = view_of(history)
    primary, small = health["backends"]
    restarts = raw_sum(raw, "orchestrator_backend_restarts_total", backend="primary")
    assert restarts == primary["restarts"] == 1
    assert int(health_row(view, "primary")[4]) == restarts
    assert int(health_row(view, "small")[4]) == raw_sum(raw, "orchestrator_backend_restarts_total", backend="small")

    recent = [line for line in view.splitlines() if line.startswith("recent: ")]
    assert len(recent) == 2
    # Most recent first: small went down after primary was back.
    m = re.match(r"recent: small down since (\S+) \((\d+) s so far\); last error: connection refused$", recent[0])
    assert m, recent[0]
    assert m[1] == clock(small["since"]) and int(m[2]) == round(now - small["since"]) == 90
    m = re.match(r"recent: primary restarted at (\S+) \((\d+) restart in all\), ready again (\d+) s later, "
                 r"at (\S+); last error: (.*)$", recent[1])
    assert m, recent[1]
    assert m[1] == clock(primary["last_restart"]) == "14:02:07"
    assert int(m[2]) == restarts
    assert int(m[3]) == round(primary["since"] - primary["last_restart"]) == 38
    assert m[4] == clock(primary["since"]) == "14:02:45"
    assert m[5] == primary["last_error"]
    assert "    why: connection refused" in view


def test_every_number_printed_is_accounted_for(history):
    """No figure in the view is made up: each bound is a bucket bound of the exposition."""
    raw = parse_raw(history[0])
    les = {float(labels["le"]) for n, labels, _ in raw if n.endswith("_bucket")}
    view = view_of(history)
    for op, number, unit in re.findall(r"(<=|>) ([\d.]+)(?: (ms|s))?", view):
        value = float(number) / 1000 if unit == "ms" else float(number)
        assert value in les, (op, number, unit)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(min_value=0, max_value=5000, allow_nan=False), min_size=1, max_size=60),
       q=st.sampled_from([.5, .9, .95, .99]))
def test_bucket_bound_holds_the_nearest_rank_quantile(values, q):
    m = Metrics(CollectorRegistry(), ["primary"])
    for v in values:
        m.ttft.labels("primary", "main").observe(v)
    raw = parse_raw(generate_latest(m.registry).decode())
    buckets = raw_buckets(raw, "orchestrator_ttft_seconds", "primary")
    bound = status_view.bucket_bound(buckets, q)
    truth = nearest_rank(values, q)
    assert bound.le == bucket_of(truth, LATENCY_BUCKETS)
    assert bound.top == max(LATENCY_BUCKETS)
    below = max((le for le in LATENCY_BUCKETS if le < bound.le), default=0.0)
    assert truth <= bound.le and (truth > below or truth == 0)
    assert status_view.bucket_bound([(le, 0.0) for le, _ in buckets], q) is None
