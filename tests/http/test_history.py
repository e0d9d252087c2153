"""The dashboard's in-memory hour: bounded buckets, averages of what finished."""

from orchestrator.http.history import History


def _view(**kw):
    return {"backend": "primary", "state": "done", "in_state": 1.0, "wait": 0.5, "ttft": 1.0,
            "cached": 30, "computed": 10, "output": 20, "tps": 10.0, **kw}


def test_requests_of_one_step_average_into_one_point():
    now = [1000.0]
    h = History(span=60, step=10, clock=lambda: now[0])
    h.add(_view(wait=1.0, ttft=2.0))
    h.add(_view(wait=3.0, ttft=4.0, cached=10, computed=30))
    (p,) = h.snapshot()["points"]
    assert p == {"t": 1000.0, "requests": 2, "wait": 2.0, "ttft": 3.0, "hit": 0.5, "tps": 10.0}


def test_a_request_without_a_slot_or_tokens_adds_no_wait_or_ttft():
    h = History(clock=lambda: 5.0)
    h.add({"backend": None, "state": "done", "in_state": None, "wait": 9.0, "ttft": None, "cached": 0,
           "computed": 0, "output": 0, "tps": None})
    (p,) = h.snapshot()["points"]
    assert p["requests"] == 1 and p["wait"] is None and p["ttft"] is None and p["hit"] is None


def test_memory_is_bounded_and_old_points_leave():
    now = [0.0]
    h = History(span=60, step=10, clock=lambda: now[0])
    for i in range(100):
        now[0] = i * 10.0
        h.add(_view())
    assert len(h.buckets) == 6
    assert [p["t"] for p in h.snapshot()["points"]] == [940.0, 950.0, 960.0, 970.0, 980.0, 990.0]
    now[0] = 5000.0
    assert h.snapshot()["points"] == []
