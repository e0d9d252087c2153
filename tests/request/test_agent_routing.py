"""Through the gateway (handlers, proxy) with a fake model: work on a background name is forwarded,
housekeeping is answered locally, identity headers steer only their own requests and never fail one."""

import asyncio

from conftest import gateway_with
from multidict import CIMultiDict

from orchestrator.backends import identity
from orchestrator.backends.gateway import GATEWAY
from testkit.client import sample
from testkit.engine import FakeEngine


async def _metric(http, base, name, **labels) -> float:
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


async def test_a_haiku_named_agent_turn_reaches_the_model(gateway, fake, http):
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    capture = sample("agent-explore-2.1.197.json")
    headers = {k: v for k, v in capture["headers"].items() if k.lower() not in ("host", "content-length")}
    async with http.post(base + "/v1/messages", json=capture["body"], headers=headers) as r:
        text = await r.text()
    assert r.status == 200 and "event: message_stop" in text
    assert f.requests and f.requests[-1]["model"] == capture["body"]["model"]  # the model answered it
    assert await _metric(http, base, "orchestrator_routes_total", route="main", reason="background_name_work") == 1
    assert await _metric(http, base, "orchestrator_synthetic_responses_total") == 0
    assert await _metric(http, base, "orchestrator_requester_requests_total", kind="agent") == 1
    async with http.get(base + "/health") as r:
        tree = (await r.json())["agents"]
    (session,) = tree["sessions"]
    h = CIMultiDict(capture["headers"])
    assert session["id"] == h[identity.SESSION][:8] and session["main"] is None
    (agent,) = session["agents"]
    assert agent == {**agent, "id": h[identity.AGENT][:8], "backend": "primary", "queued": 0, "running": 0,
                     "requests": 1}


async def test_haiku_named_housekeeping_is_still_answered_locally(gateway, fake, http):
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    for name, reason in (("topic-2.0.77.json", "topic"), ("warmup-2.0.77.json", "warmup")):
        async with http.post(base + "/v1/messages", json=sample(name)["body"]) as r:
            assert r.status == 200
            await r.read()
        assert await _metric(http, base, "orchestrator_routes_total", route="synthetic", reason=reason) == 1
    assert f.requests == []


async def test_forged_identity_headers_never_fail_a_request_nor_grow_the_tree(gateway, fake, http):
    f, url = fake
    base, gw = await gateway_with(gateway, url)
    body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    bad = [{identity.SESSION: "x" * 5000}, {identity.SESSION: "a b/../c"}, {identity.AGENT: "lonely"},
           {identity.SESSION: "", identity.AGENT: "x" * 300}, {identity.SESSION: "séance"},
           {identity.SESSION: "s;1", identity.AGENT: "a\\1"}]
    for headers in bad:
        async with http.post(base + "/v1/messages", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
    assert len(gw.agents) == 0  # none of them named a session the gateway would keep
    assert await _metric(http, base, "orchestrator_requester_requests_total", kind="anonymous") == len(bad)

    async def one(i: int) -> int:
        async with http.post(base + "/v1/messages", json=body,
                             headers={identity.SESSION: f"s{i}", identity.AGENT: f"a{i}"}) as r:
            await r.read()
            return r.status

    assert set(await asyncio.gather(*(one(i) for i in range(400)))) == {200}
    assert len(gw.agents) == gw.agents.max_sessions  # least recently seen forgotten past the bound
    assert set(gw.agents.in_flight().values()) == {0}
    assert gw.backends["primary"].queue.busy == 0


async def test_in_a_pool_two_agents_with_one_prefix_are_two_conversations(gateway, serve_app, http, caplog):
    """Two agents given the same task (same prefix): told apart by their headers, each keeps its own
    home; the same body without headers is one conversation, as before."""
    fakes = [FakeEngine(), FakeEngine()]
    urls = [await serve_app(f.app()) for f in fakes]
    base, app = await gateway({"backends": [{"name": n, "url": u} for n, u in zip("ab", urls)]})
    gw = app[GATEWAY]
    body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "same task"}]}
    caplog.set_level("INFO", logger="orchestrator.http.handlers")
    for turn in range(2):
        for agent in ("a1", "a2"):
            async with http.post(base + "/v1/messages", json=body,
                                 headers={identity.SESSION: "s1", identity.AGENT: agent}) as r:
                assert r.status == 200
                await r.read()
    assert gw.pool.snapshot()["conversations"] == 2
    for _ in range(2):
        async with http.post(base + "/v1/messages", json=body) as r:
            await r.read()
    assert gw.pool.snapshot()["conversations"] == 3
    # The log says who asked and why the request went where it went (ids cut short).
    assert any("agent 'claude-haiku-4-5' -> main a,b (background_name_work; session s1 agent a2)" in m
               for m in caplog.messages), caplog.messages
    assert any("anonymous 'claude-haiku-4-5' -> main a,b (background_name_work)" in m for m in caplog.messages)
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    assert 'orchestrator_requesters_in_flight{kind="agent",state="running"} 0.0' in text
