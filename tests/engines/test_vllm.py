"""vLLM's adapter: its own load, read from /metrics, in a pool's placement (the real engine:
tests/real/test_vllm.py)."""

from test_foreign import BODY, engine_of

from orchestrator.backends.gateway import GATEWAY

LOADED = ('vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
          'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
          'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75\n')
IDLE = LOADED.replace(" 2.0", " 0.0").replace(" 4.0", " 0.0").replace(" 0.75", " 0.0")


async def test_an_engine_busy_with_other_clients_gets_no_new_conversation(gateway, serve_app, http):
    """Two vLLMs of one model; the first runs two and holds four of other clients' requests, as its
    /metrics says: new conversations go to the second, and /health shows both engines' word."""
    busy, idle = engine_of("vllm"), engine_of("vllm")
    busy.metrics, idle.metrics = LOADED, IDLE
    base, app = await gateway({"backends": [
        {"name": "busy", "url": await serve_app(busy.app()), "slots": 2},
        {"name": "idle", "url": await serve_app(idle.app()), "slots": 2}]})
    gw = app[GATEWAY]
    for b in gw.backends.values():
        await b.health.check(timeout=5)
    assert gw.backends["busy"].queue.outside == 6 and gw.backends["idle"].queue.outside == 0
    for i in range(3):
        async with http.post(base + "/v1/messages", json={**BODY, "stream": False, "messages": [
                {"role": "user", "content": f"conversation {i}"}]}) as r:
            assert r.status == 200
    assert len(busy.requests) == 0 and len(idle.requests) == 3
    async with http.get(base + "/health") as r:
        loads = {b["name"]: b["engine_load"] for b in (await r.json())["backends"]}
    assert loads["busy"] == {"running": 2, "waiting": 4, "kv_usage": 0.75}, loads
