"""The dashboard's routes against a fake backend: login, CSRF, Origin, Cancel, CSP, size."""

import asyncio
import time

import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.http import page as dashboard_page
from orchestrator.http.page import COOKIE, CSRF_HEADER, WEB, make_ticket

KEY = "k" * 32
MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


async def _start(start_gateway, url, **gateway):
    base, app = await start_gateway({"backends": [{"name": "primary", "url": url, "slots": 1}],
                                     "gateway": gateway})
    return base, app


async def _state(http, base, **kw):
    async with http.get(base + "/dashboard/api/state", **kw) as r:
        return r.status, (await r.json()) if r.status == 200 else await r.read()


async def _until(pred, timeout=30.0):  # polled: the bound only for a page that never gets there
    for _ in range(int(timeout / 0.05)):
        v = await pred()
        if v:
            return v
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_page_and_assets_stay_under_300_kb():
    total = sum(p.stat().st_size for p in WEB.iterdir())
    assert 0 < total < 300 * 1024, total


async def test_page_has_a_strict_csp_and_no_inline_script(gateway, fake, http):
    _, url = fake
    base, _ = await _start(gateway, url)
    async with http.get(base + "/dashboard") as r:
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    # Every script is a file of the package; no inline script or style attribute.
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    async with http.get(base + "/dashboard/static/dashboard.js") as r:
        assert r.status == 200 and r.content_type == "application/javascript"
    js = (WEB / "dashboard.js").read_text()
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


async def test_without_a_key_loopback_sees_the_state(gateway, fake, http):
    _, url = fake
    base, _ = await _start(gateway, url)
    status, s = await _state(http, base)
    assert status == 200 and s["backends"][0]["name"] == "primary" and s["csrf"]


async def test_with_a_key_the_state_needs_a_login(gateway, fake, http):
    _, url = fake
    base, _ = await _start(gateway, url, api_key=KEY)
    status, body = await _state(http, base)
    assert status == 401 and b"authentication_error" in body
    # The page itself holds no data: it loads, and says how to log in.
    async with http.get(base + "/dashboard") as r:
        assert r.status == 200
    status, _ = await _state(http, base, headers={"x-api-key": KEY})
    assert status == 200
    status, _ = await _state(http, base, headers={"x-api-key": "wrong"})
    assert status == 401


async def test_a_ticket_logs_in_once_with_a_strict_cookie(gateway, fake, http):
    _, url = fake
    base, _ = await _start(gateway, url, api_key=KEY)
    ticket = make_ticket(KEY)
    async with http.get(f"{base}/dashboard/login?t={ticket}", allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/dashboard"
        cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    status, _ = await _state(http, base, headers={"Cookie": f"{COOKIE}={value}"})
    assert status == 200
    # Used once: the same link again is refused.
    async with http.get(f"{base}/dashboard/login?t={ticket}", allow_redirects=False) as r:
        assert r.status == 401
    # A forged cookie, an expired or foreign-key ticket: refused.
    status, _ = await _state(http, base, headers={"Cookie": f"{COOKIE}={int(time.time()) + 999}.00"})
    assert status == 401
    for bad in (make_ticket(KEY, now=time.time() - 600), make_ticket("another-key"), "1.2.3", ""):
        async with http.get(f"{base}/dashboard/login?t={bad}", allow_redirects=False) as r:
            assert r.status == 401, bad


async def test_a_foreign_origin_can_neither_read_nor_cancel(gateway, fake, http):
    f, url = fake
    base, app = await _start(gateway, url)
    evil = {"Origin": "http://evil.example"}
    status, _ = await _state(http, base, headers=evil)
    assert status == 403
    async with http.post(base + "/dashboard/api/cancel/1", headers={**evil, CSRF_HEADER: "x"}) as r:
        assert r.status == 403
    async with http.get(base + "/dashboard", headers={"Host": "evil.example"}) as r:
        assert r.status == 403  # DNS rebinding


async def test_cancel_needs_the_csrf_token(gateway, fake, http):
    f, url = fake
    f.mode = "stall"
    base, app = await _start(gateway, url)
    task = asyncio.create_task(http.post(base + "/v1/messages", json=MAIN))

    async def running():
        _, s = await _state(http, base)
        return [r for r in s["inflight"] if r["state"] == "prefill"] and s

    s = await _until(running)
    rid = s["inflight"][0]["id"]
    async with http.post(f"{base}/dashboard/api/cancel/{rid}") as r:
        assert r.status == 403
    async with http.post(f"{base}/dashboard/api/cancel/{rid}", headers={CSRF_HEADER: "0" * 64}) as r:
        assert r.status == 403
    async with http.post(f"{base}/dashboard/api/cancel/{rid}", headers={CSRF_HEADER: s["csrf"]}) as r:
        assert r.status == 200
    async with await task as resp:
        assert resp.status == 409 and (await resp.json())["type"] == "error"
    gw = app[GATEWAY]
    # Counted as a vanished client's, in its slot; the slot is free once the backend let go.
    await _until(lambda: asyncio.sleep(0, gw.backends["primary"].queue.busy == 0))
    assert f.max_in_flight == 1
    _, s = await _state(http, base)
    assert s["recent"][0]["status"] == "cancelled" and s["totals"]["disconnects"]["in_slot"] == 1
    async with http.post(f"{base}/dashboard/api/cancel/{rid}", headers={CSRF_HEADER: s["csrf"]}) as r:
        assert r.status == 404


async def test_cancel_a_queued_request_and_a_streaming_one(gateway, fake, http):
    f, url = fake
    f.chunk_delay = 0.5
    f.parts = 40
    base, app = await _start(gateway, url)
    first = asyncio.create_task(http.post(base + "/v1/messages", json={**MAIN, "stream": True}))
    second = asyncio.create_task(http.post(base + "/v1/messages", json=MAIN,
                                           headers={"X-Claude-Code-Session-Id": "<script>s</script>"}))

    async def both():
        _, s = await _state(http, base)
        states = [r["state"] for r in s["inflight"]] + [r["state"] for r in s["queue"]]
        return states == ["generating", "queued"] and s["queued"] == 1 and s

    s = await _until(both)
    queued = s["queue"][0]
    assert queued["session"] == "<script>s</script>"
    async with http.post(f"{base}/dashboard/api/cancel/{queued['id']}", headers={CSRF_HEADER: s["csrf"]}) as r:
        assert r.status == 200
    async with await second as resp:
        assert resp.status == 409
    running = next(r for r in s["inflight"] if r["state"] == "generating")
    async with http.post(f"{base}/dashboard/api/cancel/{running['id']}", headers={CSRF_HEADER: s["csrf"]}) as r:
        assert r.status == 200
    # Mid-stream: the connection is closed, like a vanished client's; no whole answer reaches it.
    resp = await first
    with pytest.raises(Exception):
        body = await resp.read()
        assert b"message_stop" not in body
        raise ConnectionError("cut")
    gw = app[GATEWAY]
    await _until(lambda: asyncio.sleep(0, gw.backends["primary"].queue.busy == 0))
    _, s = await _state(http, base)
    assert {r["status"] for r in s["recent"][:2]} == {"cancelled"}
    assert s["totals"]["disconnects"]["queued"] == 1 and s["totals"]["disconnects"]["in_slot"] == 1
    assert f.max_in_flight == 1


async def test_finished_requests_feed_recent_history_and_totals(gateway, fake, http):
    _, url = fake
    base, _ = await _start(gateway, url)
    async with http.post(base + "/v1/messages", json=MAIN) as r:
        assert r.status == 200
    _, s = await _state(http, base)
    done = s["recent"][0]
    assert done["route"] == "main" and done["backend"] == "primary" and done["status"] == "200"
    assert (done["computed"], done["cached"], done["output"]) == (10, 3, 5)
    assert done["cache"] == "new"  # why its prompt was computed: the conversation's first turn
    assert s["totals"]["requests"]["200"] == 1 and s["totals"]["prompt"] == {"hit": 3, "miss": 10}
    assert s["history"]["points"][-1]["requests"] == 1
    assert s["backends"][0]["llama_slots"] is not None


def test_login_url_without_a_key_is_the_page():
    assert dashboard_page.login_url("http://127.0.0.1:9090", None) == "http://127.0.0.1:9090/dashboard"
    assert "/dashboard/login?t=" in dashboard_page.login_url("http://127.0.0.1:9090", KEY)


async def test_the_state_answers_while_a_backend_is_down(gateway, http):
    from testkit.servers import free_port

    base, _ = await _start(gateway, f"http://127.0.0.1:{free_port()}")  # nothing listens there

    async def down():
        status, s = await _state(http, base)
        assert status == 200
        return s["backends"][0]["state"] == "down" and s

    s = await _until(down)
    assert s["backends"][0]["llama_slots"] is None


def test_a_ticket_made_before_a_restart_is_refused_after_it():
    from orchestrator.http.page import Dashboard
    made_before = make_ticket(KEY, now=time.time() - 5)  # taken, maybe, by the process before
    restarted = Dashboard(KEY)
    assert not restarted.take_ticket(made_before)
    fresh = make_ticket(KEY)
    assert restarted.take_ticket(fresh) and not restarted.take_ticket(fresh)
