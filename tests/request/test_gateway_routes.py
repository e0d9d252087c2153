"""The gateway against fake upstreams, where requests go: background requests to the small model or
answered by the gateway, count_tokens never on a slot, a pool spreading requests and retrying elsewhere."""

import asyncio
import json

from test_gateway import MAIN, _events, _start, post

from orchestrator.backends.gateway import GATEWAY
from testkit.client import sample
from testkit.engine import FakeEngine


async def test_background_goes_to_small_model_never_to_primary(gateway, serve_app, http):
    big, small = FakeEngine(), FakeEngine()
    big_url, small_url = await serve_app(big.app()), await serve_app(small.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": big_url},
                                           {"name": "small", "url": small_url, "role": "background"}],
                              "routing": {"background": "small"}})
    big.prefill_delay = 5  # the background answers below take milliseconds: room for a loaded machine
    main = asyncio.create_task(post(http, base, {**MAIN, "stream": True}))
    async with asyncio.timeout(30):  # the main request is in the primary's prefill
        while big.generations_started == 0:
            await asyncio.sleep(0.01)
    for name in ("title-2.1.332.json", "topic-2.0.77.json", "warmup-2.0.77.json"):
        status, raw, _ = await post(http, base, sample(name)["body"])
        assert status == 200 and _events(raw)[-1].event == "message_stop"
    assert not main.done()  # background answers did not wait behind the main request
    assert (await main)[0] == 200
    assert len(big.requests) == 1 and len(small.requests) == 3


async def test_background_synthetic_when_small_model_down(gateway, fake, http):
    f, url = fake
    base, app = await gateway({"backends": [{"name": "primary", "url": url},
                                            {"name": "small", "url": "http://127.0.0.1:9", "role": "background"}],
                               "routing": {"background": "small"}})
    gw = app[GATEWAY]
    for _ in range(50):
        if not gw.backends["small"].health.up:
            break
        await asyncio.sleep(0.05)
    status, raw, _ = await post(http, base, sample("title-2.1.332.json")["body"])
    events = _events(raw)
    text = events[2].json()["delta"]["text"]
    assert status == 200 and "title" in json.loads(text)
    assert f.requests == []


async def test_synthetic_non_streaming_and_count_probe(gateway, fake, http):
    f, url = fake
    base, _ = await _start(gateway, url)
    body = {**sample("topic-2.0.77.json")["body"], "stream": False}
    status, raw, _ = await post(http, base, body)
    msg = json.loads(raw)
    assert status == 200 and msg["type"] == "message" and msg["model"] == "claude-haiku-4-5-20251001"
    json.loads("{" + msg["content"][0]["text"])
    probe = sample("count-probe-2.1.197.json")["body"]
    status, raw, _ = await post(http, base, probe)
    _, counted, _ = await post(http, base, probe, path="/v1/messages/count_tokens?beta=true")
    assert json.loads(raw)["usage"]["input_tokens"] == json.loads(counted)["input_tokens"] > 1000
    assert f.requests == []  # neither the probe nor the count took a generation


async def test_count_tokens_burst_never_takes_a_slot(gateway, fake, http):
    f, url = fake
    f.mode = "stall"
    base, gw = await _start(gateway, url)
    running = asyncio.create_task(post(http, base, MAIN))
    while gw.backends["primary"].queue.busy == 0:
        await asyncio.sleep(0.01)
    body = sample("count_tokens-2.1.197.json")["body"]
    bodies = [{**body, "tools": [{"name": f"t{i % 5}", "input_schema": {"type": "object"}}]} for i in range(25)]
    t0 = asyncio.get_running_loop().time()
    results = await asyncio.gather(*[post(http, base, b, path="/v1/messages/count_tokens?beta=true")
                                     for b in bodies])
    # Not behind the stalled slot (an hour): a bound wide enough for any loaded machine.
    assert asyncio.get_running_loop().time() - t0 < 30
    assert all(s == 200 and json.loads(r)["input_tokens"] > 0 for s, r, _ in results)
    assert f.count_calls == 5  # the same content was counted once
    assert gw.backends["primary"].queue.depth == 0
    running.cancel()


async def test_count_tokens_falls_back_to_estimate_when_backend_slow_or_down(gateway, fake, http):
    f, url = fake
    f.count_delay = 5
    base, _ = await _start(gateway, url, gateway={"count_tokens_timeout_seconds": 0.2})
    body = sample("count_tokens-2.1.197.json")["body"]
    status, raw, _ = await post(http, base, body, path="/v1/messages/count_tokens")
    assert status == 200 and 100 < json.loads(raw)["input_tokens"] < 1000
    base2, _ = await gateway({"backends": [{"name": "p", "url": "http://127.0.0.1:9"}]})
    status, raw, _ = await post(http, base2, body, path="/v1/messages/count_tokens")
    assert status == 200 and json.loads(raw)["input_tokens"] > 0


async def test_pool_spreads_requests_and_a_retry_moves_to_a_healthy_backend(gateway, serve_app, http):
    a, b = FakeEngine(chunk_delay=0.01), FakeEngine(chunk_delay=0.01)
    url_a, url_b = await serve_app(a.app()), await serve_app(b.app())
    base, app = await gateway({"backends": [{"name": "a", "url": url_a, "models": ["glm-*"]},
                                            {"name": "b", "url": url_b, "models": ["glm-*"]}]})
    body = {**MAIN, "model": "glm-5", "stream": True}
    # Eight conversations (one conversation would stay on one backend: test_pool.py).
    results = await asyncio.gather(*[post(http, base, {**body, "messages": [{"role": "user", "content": f"hi {i}"}]})
                                     for i in range(8)])
    assert all(s == 200 and _events(r)[-1].event == "message_stop" for s, r, _ in results)
    assert len(a.requests) >= 2 and len(b.requests) >= 2  # both served
    assert a.max_in_flight == 1 and b.max_in_flight == 1 and not (a.crashed or b.crashed)
    # "a" fails before answering: the retry goes to "b" instead of waiting for "a".
    a.fail_next = 1
    before_b = len(b.requests)
    status, raw, _ = await post(http, base, body)
    assert status == 200 and _events(raw)[-1].event == "message_stop"
    assert len(b.requests) == before_b + 1
