"""The dashboard in a real headless chromium, on a gateway in front of the real llama-server.

One browser, one gateway (with a key, so the login is the real one), one walk through what a person
does: log in with the printed link, watch a request run, cancel it, and see the backend free again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.configfile import config_from_dict
from orchestrator.http.app import create_app, start
from orchestrator.http.page import login_url
from testkit.browser import Browser
from testkit.servers import free_port, page

pytestmark = pytest.mark.real

KEY = "dashboard-test-key-0123456789"
AUTH = {"x-api-key": KEY}
MARKUP = "<script>window.pwned=1</script></textarea><b>bold</b>"
LONG = {"model": "smollm2", "max_tokens": 3000, "stream": True,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon, at least 3000 words."}]}
SHORT = {"model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}


async def _gateway(llama_url: str, port: int, saves: Path):
    # A save budget no disk holds: the card says so (kv/folder.py), as /health does.
    config = config_from_dict({"gateway": {"api_key": KEY, "health_interval_seconds": 0.3},
                               "backends": [{"name": "primary", "url": llama_url, "slots": 1,
                                             "kv_save_dir": str(saves), "kv_save_max_bytes": 10 ** 18}]})
    app = create_app(config, CollectorRegistry())
    return await start(app, "127.0.0.1", port)


async def _metrics(http, base) -> dict[str, float]:
    async with http.get(base + "/metrics", headers=AUTH) as r:
        text = await r.text()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0) + s.value
    return sums


def _page_number(element_id: str) -> str:
    return f"Number((document.getElementById({json.dumps(element_id)})||{{}}).textContent?.replace(/,/g, ''))"


async def _until_free(http, base, llama_url, timeout=60.0):
    """The gateway's slot is free and llama-server processes nothing."""
    for _ in range(int(timeout / 0.2)):
        async with http.get(base + "/health", headers=AUTH) as r:
            busy = (await r.json())["backends"][0]["busy"]
        async with http.get(llama_url + "/slots") as r:
            processing = any(s.get("is_processing") for s in await r.json())
        if busy == 0 and not processing:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the backend is still busy")


async def test_the_dashboard_in_a_real_browser(llama, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    runner = await _gateway(llama.url, port, tmp_path / "slots")
    browser = await Browser(tmp_path).start()
    evil_runner = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        try:
            # A request before the page opens, so there are figures to compare.
            async with http.post(base + "/v1/messages", json=SHORT, headers=AUTH) as r:
                assert r.status == 200, await r.text()

            # ---- log in with the link `orchestrator dashboard` prints -------------------------------
            await browser.goto(login_url(base, KEY))
            await browser.until("document.getElementById('conn')?.textContent === 'live'")
            assert await browser.eval("location.pathname") == "/dashboard"
            # The cookie is HttpOnly: the page's script cannot read it.
            assert await browser.eval("document.cookie") == ""

            # ---- the figures it shows equal /metrics ----------------------------------------------
            m = await _metrics(http, base)
            want_requests = int(m["orchestrator_requests_total"])
            want_output = int(m["orchestrator_output_tokens_total"])
            assert want_requests == 1 and want_output > 0
            await browser.until(f"{_page_number('total-requests')} === {want_requests} && "
                                f"{_page_number('total-output')} === {want_output}")
            assert await browser.eval("document.querySelectorAll('#recent tbody tr').length") == 1
            # Why its prompt was computed (cachemiss.py): the conversation's first turn.
            assert "new" in await browser.eval("[...document.querySelectorAll('#recent tbody td')]"
                                               ".map(t => t.textContent)")

            # ---- the model's family and what it means for its KV, as /health says (model_cache.py) ----
            async with http.get(base + "/health", headers=AUTH) as r:
                line = (await r.json())["backends"][0]["model_cache"]["line"]
            assert line.startswith("dense llama: slot restore works"), line
            await browser.until("[...document.querySelectorAll('.model-cache')].some(e => e.textContent === "
                                f"{json.dumps('model cache: ' + line)})")
            # Its save folder, and a budget that disk cannot hold.
            await browser.until("[...document.querySelectorAll('.kv-folder-problem')].some(e => "
                                "e.textContent.includes('is more than this disk can give the saves'))")
            assert (await browser.eval("document.querySelector('.kv-folder').textContent")).startswith("kv saves: ")

            # ---- it changes while a request runs; markup in a header shows as text -------------------
            long = asyncio.create_task(http.post(base + "/v1/messages", json=LONG,
                                                 headers={**AUTH, "X-Claude-Code-Session-Id": MARKUP}))
            await browser.until("[...document.querySelectorAll('#running tbody td')]"
                                ".some(td => td.textContent === 'generating')", timeout=120)
            cells = await browser.eval("[...document.querySelectorAll('#running tbody td')].map(t => t.textContent)")
            assert MARKUP in cells
            assert await browser.eval("document.querySelectorAll('script').length") == 1
            assert await browser.eval("document.querySelectorAll('#running b, #running textarea').length") == 0
            assert await browser.eval("window.pwned === undefined")
            before = await browser.eval(_page_number("total-requests"))
            shot_dir = Path(os.environ.get("ORCHESTRATOR_SCREENSHOTS", tmp_path))
            shot_dir.mkdir(parents=True, exist_ok=True)
            desktop = await browser.screenshot(shot_dir / "dashboard.png", 1280, 900)
            phone = await browser.screenshot(shot_dir / "dashboard-phone.png", 390, 844, mobile=True)
            assert desktop[:8] == phone[:8] == b"\x89PNG\r\n\x1a\n"
            await browser.send("Emulation.clearDeviceMetricsOverride")

            # ---- Cancel ends it; the backend is free afterwards ------------------------------------
            await browser.eval("document.querySelector('#running button').click()")
            resp = await long
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # cut mid-stream, like a client that vanished
            await browser.until("[...document.querySelectorAll('#recent tbody td')]"
                                ".some(td => td.textContent === 'cancelled')")
            await _until_free(http, base, llama.url)
            m = await _metrics(http, base)
            assert m["orchestrator_client_disconnects_total"] == 1
            async with http.post(base + "/v1/messages", json=SHORT, headers=AUTH) as r:
                assert r.status == 200
            await browser.until(f"{_page_number('total-requests')} === {int(before) + 2}")

            # ---- a gateway restart: the page reconnects, its login still good ------------------------
            await runner.cleanup()
            await browser.until("document.getElementById('conn').textContent.startsWith('reconnecting')")
            runner = await _gateway(llama.url, port, tmp_path / "slots")
            await browser.until("document.getElementById('conn')?.textContent === 'live'", timeout=30)

            # ---- no network: everything the page asked for came from the gateway ----------------------
            assert browser.requested and all(u.startswith(base) for u in browser.requested), browser.requested

            # ---- a foreign origin can neither read nor cancel ----------------------------------------
            evil_runner = web.AppRunner(page("<html><body>evil</body></html>"))
            await evil_runner.setup()
            evil_port = free_port()
            await web.TCPSite(evil_runner, "127.0.0.1", evil_port).start()
            # localhost and 127.0.0.1 are different origins, and the browser sends the cookie to neither
            # cross-site request (SameSite=Strict); the gateway refuses the Origin anyway.
            await browser.goto(f"http://localhost:{evil_port}/")
            await browser.until("document.body?.textContent === 'evil'")
            read = await browser.eval(f"fetch({json.dumps(base + '/dashboard/api/state')}, {{credentials: 'include'}})"
                                      ".then(r => 'read ' + r.status).catch(e => 'blocked')")
            assert read == "blocked"
            refused_before = (await _metrics(http, base)).get("orchestrator_rejections_total", 0)
            await browser.eval(f"fetch({json.dumps(base + '/dashboard/api/cancel/1')}, {{method: 'POST', "
                               "mode: 'no-cors', credentials: 'include'}).then(() => 'sent', () => 'failed')")
            m = await _metrics(http, base)
            assert m["orchestrator_rejections_total"] >= refused_before + 1
        finally:
            await browser.close()
            await runner.cleanup()
            if evil_runner is not None:
                await evil_runner.cleanup()


def test_chromium_comes_from_the_project_set_up():
    """`make test` installs it on a fresh machine (deploy/ensure-tools.sh): its name is in TEST_TOOLS."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    tools = next(line for line in makefile.splitlines() if line.startswith("TEST_TOOLS"))
    assert "chromium" in tools.split()
    assert shutil.which("chromium")
