from pathlib import Path

import pytest

from orchestrator.config import ConfigError, config_from_dict, load_config

EXAMPLE = Path(__file__).parent.parent / "deploy" / "orchestrator.example.toml"


def test_defaults_without_file():
    c = config_from_dict({})
    assert c.gateway.port == 9090 and c.backends[0].url == "http://127.0.0.1:8080"
    assert c.backends[0].slots == 1 and c.routing.background == "synthetic"


def test_every_problem_reported_at_once_naming_its_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({
            "gateway": {"port": "x", "bogus": 1},
            "queue": {"max_depth": -1},
            "backends": [{"name": "a", "url": "ftp://x", "slots": 0},
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
