import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from orchestrator.config import TABLES, BackendConfig, ConfigError
from orchestrator.configfile import (
    config_from_dict,
    describe,
    load_config,
    render_example,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "orchestrator.example.toml"


def test_defaults_without_file():
    c = config_from_dict({})
    assert c.gateway.port == 9090 and c.backends[0].url == "http://127.0.0.1:8080"
    assert c.backends[0].slots == 0 and c.routing.background == "synthetic"


def test_every_problem_reported_at_once_naming_its_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({
            "gateway": {"port": "x", "bogus": 1},
            "queue": {"max_depth": -1},
            "backends": [{"name": "a", "url": "ftp://x", "slots": -1},
                         {"name": "a", "url": "http://h", "role": "sideways"}],
            "routing": {"background": "nope"},
        })
    text = str(e.value)
    for needle in ["gateway.port", "gateway.bogus: unknown key", "queue.max_depth", "backends[0].url",
                   "backends[0].slots", "backends[1].role", "'a' is used more than once", "routing.background"]:
        assert needle in text, needle


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="gateway.port"):
        config_from_dict({"gateway": {"port": True}})


def test_background_backend_must_have_background_role():
    with pytest.raises(ConfigError, match='role = "background"'):
        config_from_dict({"backends": [{"name": "p", "url": "http://h"}], "routing": {"background": "p"}})


def test_missing_name_and_url_are_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"backends": [{}]})
    assert "backends[0].name: required" in str(e.value) and "backends[0].url: required" in str(e.value)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_annotated_example_is_valid():
    c = load_config(EXAMPLE)
    assert c.main_backends and c.gateway.port == 9090


def test_the_committed_example_is_generated_from_the_declarations():
    """Regenerate with: .venv/bin/orchestrator example-config > deploy/orchestrator.example.toml"""
    assert EXAMPLE.read_text() == render_example()
    parsed = tomllib.loads(EXAMPLE.read_text())
    for table, cls in TABLES.items():
        documented = set(parsed[table]) | {line.split("=")[0].strip("# ").strip()
                                           for line in EXAMPLE.read_text().splitlines() if line.startswith("# ")}
        assert {f.name for f in fields(cls)} <= documented, table


def test_every_key_is_declared_with_a_description():
    for cls in (*TABLES.values(), BackendConfig):
        for f in fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no description"


def test_environment_overrides_come_from_the_declarations():
    env = {"ORCHESTRATOR_GATEWAY_PORT": "9191", "ORCHESTRATOR_QUEUE_MAX_WAIT_SECONDS": "5",
           "ORCHESTRATOR_GATEWAY_OPEN": "true", "ORCHESTRATOR_ROUTING_BACKGROUND_MODELS": "*haiku*, small-*",
           "ORCHESTRATOR_API_KEY": "from-the-environment", "UNRELATED": "x"}
    c = config_from_dict({"gateway": {"port": 1}}, env=env)
    assert c.gateway.port == 9191 and c.queue.max_wait_seconds == 5.0 and c.gateway.open is True
    assert c.routing.background_models == ("*haiku*", "small-*") and c.gateway.api_key == "from-the-environment"
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, env={"ORCHESTRATOR_GATEWAY_PORT": "eighty", "ORCHESTRATOR_QUEUE_MAX_DEPTH": "-1"})
    assert "gateway.port: must be a port (0-65535), got 'eighty' (from ORCHESTRATOR_GATEWAY_PORT)" in e.value.problems
    assert any(p.startswith("queue.max_depth") and "ORCHESTRATOR_QUEUE_MAX_DEPTH" in p for p in e.value.problems)


def test_describe_shows_what_differs_and_hides_secrets():
    lines = describe(config_from_dict({"gateway": {"port": 9191, "api_key": "very-secret-key"}}))
    assert "gateway.port = 9191" in lines and "gateway.api_key = ***" in lines
    assert not any("very-secret-key" in line for line in lines)
    assert not any(line.startswith("queue.") for line in lines)


def test_two_backends_cannot_share_a_save_folder(tmp_path):
    from orchestrator.configfile import config_from_dict
    raw = {"backends": [{"name": "a", "url": "http://127.0.0.1:8080", "kv_save_dir": str(tmp_path)},
                        {"name": "b", "url": "http://127.0.0.1:8081", "kv_save_dir": str(tmp_path) + "/"}]}
    with pytest.raises(ConfigError, match="kv_save_dir .* more than one backend"):
        config_from_dict(raw)
