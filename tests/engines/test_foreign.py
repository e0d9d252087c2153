"""Engines other than llama-server behind the gateway: vLLM's and SGLang's Anthropic endpoints as
they shape them, https with a private CA, no health endpoint, many slots, a silent remote."""

import asyncio
import json
import ssl
import subprocess

import pytest
from aiohttp import web

from orchestrator.backends.gateway import GATEWAY
from orchestrator.sse import events as sse_events
from testkit.engine import FakeEngine, Reply

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 30, "stream": True,
        "messages": [{"role": "user", "content": "hello"}]}


def _compact(data: dict) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def vllm_stream(model: str) -> bytes:
    """As vLLM's Anthropic serving writes it: pydantic `model_dump_json(exclude_unset=True)`, so
    message_start's message has no "type" or "role"; input tokens again in message_delta."""
    def ev(name: str, data: dict) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _compact(data) + b"\n\n"

    return b"".join([
        ev("message_start", {"type": "message_start", "message": {
            "id": "chatcmpl-7f3a", "content": [], "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 0}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        *[ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": t}}) for t in ("Hel", "lo ", "é✓")],
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": {"input_tokens": 12, "output_tokens": 3}}),
        ev("message_stop", {"type": "message_stop"}),
    ])


def sglang_stream(model: str) -> bytes:
    """As SGLang's typed events serialise: every field present, CRLF line ends (as a proxy in front
    of it may write them), a comment line, ids of its own."""
    def ev(name: str, data: dict) -> bytes:
        return (f"event: {name}\r\ndata: " + json.dumps(data, ensure_ascii=False) + "\r\n\r\n").encode()

    return b"".join([
        b": keep-alive\r\n\r\n",
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_0f9e", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 0, "cache_read_input_tokens": 0}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "Hi ✓"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": 2}}),
        ev("message_stop", {"type": "message_stop"}),
    ])


VLLM_METRICS = ('vllm:cache_config_info{block_size="128",engine="0",kv_cache_max_concurrency="7.265625",'
                'kv_cache_size_tokens="59520",model_name="smollm2"} 1.0\n')

SERVED = "zai-org/GLM-5"


def answers_like(kind: str, stall_after_first: float = 0.0):
    """A script for the fake engine: vLLM's or SGLang's answer shapes and errors; a vLLM stream
    written an event at a time, silent for `stall_after_first` seconds after its second write."""
    def answer(body: dict, headers) -> Reply:
        if body.get("max_tokens", 0) > 100_000:
            # vLLM names its exception as the type (BadRequestError), SGLang writes Anthropic's.
            err = {"type": "error", "error": {"type": "BadRequestError" if kind == "vllm" else
                                              "invalid_request_error", "message": "max_tokens too large"}}
            return Reply.of_json(err, 400)
        if not body.get("stream"):
            return Reply.of_json({"id": "m1", "type": "message", "role": "assistant", "model": SERVED,
                                  "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}})
        if kind == "sglang":
            writes: list[bytes | float] = [sglang_stream(SERVED)]
        else:
            writes = [part + b"\n\n" for part in vllm_stream(SERVED).split(b"\n\n") if part]
            writes.insert(2, stall_after_first)
        return Reply(writes, headers={"Content-Type": "text/event-stream; charset=utf-8"})
    return answer


def engine_of(kind: str, max_model_len: int = 131072, capacity: int = 1, hold: float = 0.0,
           stall_after_first: float = 0.0) -> FakeEngine:
    """A fake vLLM or SGLang server: their routes, model listing, count and answer shapes."""
    return FakeEngine(script=answers_like(kind, stall_after_first), capacity=capacity, die_on_overlap=False,
                      prefill_delay=hold, count=lambda body: 7 + len(json.dumps(body["messages"])) // 4,
                      models=[{"id": SERVED, "object": "model", "owned_by": kind, "max_model_len": max_model_len}])


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_engine_streams_pass_through_unchanged_but_the_model_name(kind, gateway, serve_app, http):
    engine = engine_of(kind)
    url = await serve_app(engine.app())
    base, app = await gateway({"backends": [{"name": "big", "url": url, "slots": 1}]})
    async with http.post(base + "/v1/messages?beta=true", json=BODY) as r:
        assert r.status == 200
        raw = await r.read()
    direct = vllm_stream(SERVED) if kind == "vllm" else sglang_stream(SERVED)
    # Every event after message_start arrives in the engine's own bytes.
    start = raw.index(b"event: content_block_start")
    assert raw[start:] == direct[direct.index(b"event: content_block_start"):]
    first = sse_events(raw)[0]
    assert first.event == "message_start" and first.json()["message"]["model"] == BODY["model"]
    # ... and message_start says what the engine said, but the client's model name.
    engine_start = sse_events(direct)[0].json()
    engine_start["message"]["model"] = BODY["model"]
    assert first.json() == engine_start
    # Non-streaming: the engine's message, renamed likewise.
    async with http.post(base + "/v1/messages", json={**BODY, "stream": False}) as r:
        msg = await r.json()
    assert r.status == 200 and msg["content"][0]["text"] == "Hello" and msg["model"] == BODY["model"]


@pytest.mark.parametrize("kind,status,error_type", [("vllm", 400, "invalid_request_error"),
                                                    ("sglang", 400, "invalid_request_error")])
async def test_engine_errors_keep_their_status_and_anthropic_type(kind, status, error_type, gateway, serve_app,
                                                                  http):
    """An Anthropic type is kept; an engine's own (vLLM's exception name) is named in the message, and
    the type is the status's."""
    engine = engine_of(kind)
    base, _ = await gateway({"backends": [{"name": "big", "url": await serve_app(engine.app())}]})
    async with http.post(base + "/v1/messages", json={**BODY, "stream": False, "max_tokens": 200_000}) as r:
        body = await r.json()
    assert r.status == status and body["type"] == "error" and body["error"]["type"] == error_type
    assert "max_tokens too large" in body["error"]["message"]
    assert ("[BadRequestError]" in body["error"]["message"]) == (kind == "vllm")


async def test_count_tokens_is_the_engines_own_and_its_context_comes_from_v1_models(gateway, serve_app, http):
    engine = engine_of("vllm", max_model_len=65536)
    base, app = await gateway({"backends": [{"name": "big", "url": await serve_app(engine.app())}]})
    async with http.post(base + "/v1/messages/count_tokens?beta=true", json=BODY) as r:
        counted = await r.json()
    assert counted == {"input_tokens": 7 + len(json.dumps(BODY["messages"])) // 4} and len(engine.counted) == 1
    async with asyncio.timeout(30):  # read at a health poll: waited for, with a broken gateway's bound
        while True:
            async with http.get(base + "/health") as r:
                backend = (await r.json())["backends"][0]
            if backend.get("n_ctx"):
                break
            await asyncio.sleep(0.05)
    assert backend["state"] == "ready" and backend["n_ctx"] == 65536


async def test_continuous_batching_engine_gets_its_many_slots_at_once(gateway, serve_app, http):
    engine = engine_of("vllm", capacity=64)
    engine.script = None  # its default answers, held on its gate: no clock for 64 sends to beat
    base, app = await gateway({"backends": [{"name": "big", "url": await serve_app(engine.app()), "slots": 64}]})
    queue = app[GATEWAY].backends["big"].queue
    engine.gate.clear()

    async def one(i):
        async with http.post(base + "/v1/messages", json={**BODY, "stream": True, "metadata": {"x_fake_hold": 1},
                                                          "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
            return r.status, await r.read()

    sent = [asyncio.ensure_future(one(i)) for i in range(80)]
    async with asyncio.timeout(60):
        while engine.in_flight < 64 or queue.depth < 16:  # all its slots used, the rest waiting
            await asyncio.sleep(0.01)
    engine.gate.set()
    results = await asyncio.gather(*sent)
    assert all(s == 200 and b"event: message_stop" in raw for s, raw in results)
    assert engine.max_in_flight == 64  # never more
    assert app[GATEWAY].backends["big"].queue.busy == 0


async def test_a_server_without_any_health_endpoint_is_up_while_it_answers(gateway, serve_app, http):
    # No /health, no /slots: nothing but its answers.
    bare = FakeEngine(script=lambda body, headers: Reply([vllm_stream("m")]), health_endpoint=False,
                      slots_endpoint=False)
    url = await serve_app(bare.app())
    base, app = await gateway({"backends": [{"name": "bare", "url": url, "health_path": ""}]})
    gw = app[GATEWAY]
    async with asyncio.timeout(30):  # up once a health poll (every 0.2 s) found it: waited for, not timed
        while not gw.backends["bare"].health.up:
            await asyncio.sleep(0.05)
    async with http.post(base + "/v1/messages", json=BODY) as r:
        assert r.status == 200 and b"message_stop" in await r.read()


async def test_a_silent_remote_past_its_read_timeout_ends_in_an_sse_error(gateway, serve_app, http):
    engine = engine_of("vllm", stall_after_first=3.0)
    base, app = await gateway({"backends": [{"name": "remote", "url": await serve_app(engine.app()),
                                             "read_timeout_seconds": 0.5}]})
    async with http.post(base + "/v1/messages", json=BODY) as r:
        raw = await r.read()
    kinds = [e.event for e in sse_events(raw)]
    assert kinds[0] == "message_start" and kinds[-1] == "error" and "message_stop" not in kinds


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A private CA and a server certificate for 127.0.0.1 it signed (openssl)."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=orchestrator test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d


async def _serve_tls(app: web.Application, d) -> tuple[str, web.AppRunner]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "server.pem", d / "server.key")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return f"https://127.0.0.1:{runner.addresses[0][1]}", runner


async def test_https_backend_with_its_private_ca(gateway, http, tls_files):
    engine = engine_of("sglang")
    url, runner = await _serve_tls(engine.app(), tls_files)
    try:
        base, app = await gateway({"backends": [{"name": "remote", "url": url, "ca_file": str(tls_files / "ca.pem"),
                                                 "api_key": "remote-key"}]})
        async with http.post(base + "/v1/messages", json=BODY) as r:
            assert r.status == 200 and b"event: message_stop" in await r.read()
        # Without its CA the certificate is refused, and the health check says why.
        base2, app2 = await gateway({"backends": [{"name": "remote", "url": url}],
                                     "queue": {"down_grace_seconds": 0.5}})
        h = app2[GATEWAY].backends["remote"].health
        async with asyncio.timeout(30):  # at a health poll: waited for
            while h.up:
                await asyncio.sleep(0.05)
        assert not h.up and "TLS failed" in h.last_error and "ca_file" in h.last_error
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("content", [None, "this is not a certificate\n"], ids=["missing", "not-pem"])
def test_ca_file_must_be_a_readable_ca_bundle(tmp_path, content):
    """Checked once, at load, naming the key: an unreadable bundle would otherwise fail every request."""
    from orchestrator.config import ConfigError
    from orchestrator.configfile import config_from_dict

    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    with pytest.raises(ConfigError, match=r"backends\[0\]\.ca_file: must be a readable PEM file"):
        config_from_dict({"backends": [{"name": "r", "url": "https://example.test", "ca_file": str(ca)}]})



async def test_an_engine_that_answers_only_its_own_model_name_gets_it_and_its_max_tokens(gateway, serve_app, http):
    """vLLM 404s a model name it does not serve and 400s a max_tokens over its max_model_len: Claude
    Code's unmodified request (a claude-* name, max_tokens 32000) is sent with the engine's own name,
    and max_tokens no more than it takes, both read from its /v1/models; count_tokens likewise."""
    engine = engine_of("vllm", max_model_len=8192)
    engine.named_only = True
    base, app = await gateway({"backends": [{"name": "big", "url": await serve_app(engine.app())}]})
    health = app[GATEWAY].backends["big"].health
    await health.check(timeout=5)
    assert health.served.model == SERVED and health.n_ctx == 8192
    async with http.post(base + "/v1/messages", json={**BODY, "stream": False, "max_tokens": 32000}) as r:
        msg = await r.json()
    assert r.status == 200 and msg["model"] == BODY["model"], msg
    assert engine.requests[-1]["model"] == SERVED and engine.requests[-1]["max_tokens"] <= 8192
    async with http.post(base + "/v1/messages/count_tokens", json=BODY) as r:
        assert r.status == 200 and engine.counted[-1]["model"] == SERVED
    async with http.get(base + "/health") as r:
        assert (await r.json())["backends"][0]["served_model"] == SERVED


async def test_slots_default_to_what_the_engine_runs_and_the_queue_never_sends_more(gateway, serve_app, http):
    """No `slots` in the config: the queue takes the engine's own count (a vLLM's, from its /metrics
    here), and never has more of its requests in the engine at once."""
    engine = engine_of("vllm", capacity=3)
    engine.die_on_overlap, engine.script = True, None
    engine.metrics = VLLM_METRICS.replace("7.265625", "3.5")
    base, app = await gateway({"backends": [{"name": "p", "url": await serve_app(engine.app())}]})
    backend = app[GATEWAY].backends["p"]
    await backend.health.check(timeout=5)
    assert backend.queue.slots == 3
    engine.gate.clear()

    async def one(i):
        async with http.post(base + "/v1/messages", json={**BODY, "metadata": {"x_fake_hold": 1},
                                                          "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
            return r.status, await r.read()

    sent = [asyncio.ensure_future(one(i)) for i in range(6)]
    while backend.queue.depth < 3 or engine.in_flight < 3:  # three run in the engine, three wait
        await asyncio.sleep(0.01)
    engine.gate.set()
    results = await asyncio.gather(*sent)
    assert all(s == 200 and b"event: message_stop" in raw for s, raw in results)
    assert engine.max_in_flight == 3 and not engine.crashed
    assert app[GATEWAY].metrics.registry.get_sample_value("orchestrator_slots", {"backend": "p"}) == 3


@pytest.mark.parametrize("command,metrics,batch", [
    ("vllm serve /m --max-num-seqs 5", VLLM_METRICS, 5),   # from the command, where it is known
    (None, VLLM_METRICS, 7),                                 # else what its KV cache holds at full context
    (None, None, None)])                                     # else unknown
async def test_vllms_batch_is_its_max_num_seqs_else_its_kv_concurrency(command, metrics, batch, serve_app):
    from orchestrator.config import BackendConfig
    from orchestrator.engines.upstream import UpstreamClient
    from orchestrator.engines.vllm import Vllm

    engine = engine_of("vllm", max_model_len=8192)
    engine.metrics = metrics
    upstream = UpstreamClient()
    await upstream.start()
    try:
        vllm = Vllm(BackendConfig(name="v", url=await serve_app(engine.app())), upstream)
        vllm.command_line = command
        served = await vllm.describe(timeout=5)
    finally:
        await upstream.close()
    assert (served.batch, served.model, served.max_tokens, served.n_ctx) == (batch, SERVED, 8192, 8192)


async def test_a_router_in_front_of_the_engine_gets_each_conversations_key(gateway, serve_app, http):
    """`session_header`: a router (llm-d, an Envoy hash) keeps a conversation on the replica that
    holds its cache: every turn of a conversation carries one key, another conversation another."""
    engine = engine_of("vllm")
    base, _ = await gateway({"backends": [{"name": "big", "url": await serve_app(engine.app()),
                                           "session_header": "x-session-id"}]})

    async def turn(c: str, n: int, session: str) -> None:
        messages = [{"role": "user", "content": f"conversation {c}"}]
        for i in range(n):
            messages += [{"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": f"q{i}"}]
        async with http.post(base + "/v1/messages", headers={"X-Claude-Code-Session-Id": session},
                             json={**BODY, "stream": False, "messages": messages}) as r:
            assert r.status == 200

    for n in range(2):
        await turn("A", n, "s1")
        await turn("B", n, "s1")
    keys = [h.get("x-session-id") for h in engine.headers]
    assert all(k and len(k) == 32 for k in keys) and keys[0] == keys[2] and keys[1] == keys[3] != keys[0], keys
