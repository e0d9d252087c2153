"""Only the user gets in: keys off loopback, no web page through the browser, the listener's secret."""

import logging

import pytest
from conftest import gateway_with

from orchestrator.config import ConfigError
from orchestrator.configfile import config_from_dict, with_overrides
from testkit.engine import FakeEngine

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}
KEY = "correct-horse-battery-staple"


async def test_with_a_key_every_endpoint_but_the_probes_needs_it(gateway, fake, http, caplog):
    f, url = fake
    base, _ = await gateway_with(gateway, url, api_key=KEY)
    caplog.set_level(logging.DEBUG)
    for headers, message in (({}, "missing API key"), ({"x-api-key": "wrong-key-123"}, "invalid API key"),
                             ({"Authorization": f"Basic {KEY}"}, "missing API key"),
                             ({"Authorization": "Bearer " + KEY[:-1]}, "invalid API key")):
        for method, path in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
                             ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models")):
            async with http.request(method, base + path, json=MAIN, headers=headers) as r:
                err = (await r.json())["error"]
                assert r.status == 401 and err["type"] == "authentication_error", (path, headers)
                assert message in err["message"]
    assert f.requests == []
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        async with http.post(base + "/v1/messages", json=MAIN, headers=headers) as r:
            assert r.status == 200
    for path in ("/", "/api/hello"):
        async with http.head(base + path) as r:
            assert r.status == 200
    assert KEY not in caplog.text and "wrong-key-123" not in caplog.text


async def test_key_is_not_forwarded_to_the_backend(gateway, fake, http):
    f, url = fake
    base, _ = await gateway_with(gateway, url, api_key=KEY)
    async with http.post(base + "/v1/messages", json=MAIN, headers={"x-api-key": KEY}) as r:
        assert r.status == 200
    assert not any(KEY in v for v in f.headers[-1].values())


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:3000", "http://127.0.0.1:1"])
async def test_a_web_page_is_refused_even_on_loopback(gateway, fake, http, origin):
    f, url = fake
    base, _ = await gateway_with(gateway, url)
    for method, path in (("POST", "/v1/messages"), ("OPTIONS", "/v1/messages"), ("GET", "/health"),
                         ("POST", "/internal/process-event")):
        async with http.request(method, base + path, json=MAIN, headers={"Origin": origin}) as r:
            assert r.status == 403, (method, path)
            assert (await r.json())["error"]["type"] == "permission_error"
    assert f.requests == []


async def test_own_and_allowed_origins_pass(gateway, fake, http):
    base, _ = await gateway_with(gateway, fake[1], allowed_origins=["https://my-tool.example"])
    for origin in (base, "https://my-tool.example"):
        async with http.post(base + "/v1/messages", json=MAIN, headers={"Origin": origin}) as r:
            assert r.status == 200, origin


@pytest.mark.parametrize("host,status", [
    ("attacker.example", 403), ("attacker.example:9090", 403), ("127.0.0.1.nip.io", 403),
    ("localhost", 200), ("127.0.0.1:9", 200), ("[::1]:9090", 200), ("mine.example:1", 200),
])
async def test_dns_rebinding_is_refused_by_host(gateway, fake, http, host, status):
    base, _ = await gateway_with(gateway, fake[1], allowed_hosts=["mine.example"])
    async with http.post(base + "/v1/messages", json=MAIN, headers={"Host": host}) as r:
        assert r.status == status
        if status == 403:
            assert "Host" in (await r.json())["error"]["message"]


async def test_health_says_whether_a_key_is_required(gateway, fake, http):
    base, _ = await gateway_with(gateway, fake[1], api_key=KEY)
    async with http.get(base + "/health", headers={"x-api-key": KEY}) as r:
        assert (await r.json())["gateway"]["access"] == {"key_required": True, "open": False}


def test_off_loopback_needs_a_key_or_open():
    config = config_from_dict({})
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ConfigError, match="gateway.api_key"):
            with_overrides(config, {"host": host})
        assert with_overrides(config, {"host": host, "api_key": KEY}).gateway.api_key == KEY
        assert with_overrides(config, {"host": host, "open": True}).gateway.open
    for host in ("127.0.0.1", "localhost", "::1"):
        with_overrides(config, {"host": host})
    with pytest.raises(ConfigError, match="at least 8"):
        config_from_dict({"gateway": {"api_key": "short"}})


def test_the_key_never_shows_in_the_configs_repr():
    config = config_from_dict({"gateway": {"api_key": KEY}})
    assert KEY not in repr(config) and KEY not in str(config)


def test_two_backends_on_one_server_is_a_config_error():
    with pytest.raises(ConfigError, match="same URL"):
        config_from_dict({"backends": [{"name": "a", "url": "http://127.0.0.1:8080"},
                                       {"name": "b", "url": "http://localhost:8080/"}]})
    with pytest.raises(ConfigError, match="same URL"):
        config_from_dict({"backends": [{"name": "a", "url": "http://127.0.0.1:8080"},
                                       {"name": "bg", "url": "http://127.0.0.1:8080", "role": "background"}],
                          "routing": {"background": "bg"}})
    config_from_dict({"backends": [{"name": "a", "url": "http://127.0.0.1:8080"},
                                   {"name": "b", "url": "http://127.0.0.1:8081"}]})


async def test_either_key_header_may_carry_the_key(gateway, fake, http):
    """Claude Code with ANTHROPIC_API_KEY set sends that as x-api-key and the gateway's key as Bearer."""
    base, _ = await gateway_with(gateway, fake[1], api_key=KEY)
    async with http.post(base + "/v1/messages", json=MAIN,
                         headers={"x-api-key": "sk-ant-a-real-anthropic-key", "Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 200
    async with http.post(base + "/v1/messages", json=MAIN,
                         headers={"x-api-key": "sk-ant-a-real-anthropic-key", "Authorization": "Bearer nope-nope"}) as r:
        assert r.status == 401


async def test_a_key_header_that_is_not_utf8_is_a_401_not_a_500(gateway, fake):
    from test_bodies import raw_request

    base, _ = await gateway_with(gateway, fake[1], api_key=KEY)
    status, _, body = await raw_request(
        base, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nx-api-key: \xff\xfe\r\n\r\n", [])
    assert status == 401 and b"authentication_error" in body


async def test_the_gateways_key_is_never_forwarded_even_with_forward_client_key(gateway, serve_app, http):
    f = FakeEngine()
    url = await serve_app(f.app())
    base, _ = await gateway({"backends": [{"name": "primary", "url": url, "forward_client_key": True}],
                             "gateway": {"api_key": KEY}})
    async with http.post(base + "/v1/messages", json=MAIN,
                         headers={"x-api-key": "sk-ant-own", "Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 200
    assert f.headers[-1].get("x-api-key") == "sk-ant-own"
    assert not any(KEY in v for v in f.headers[-1].values())
