import asyncio

from click.testing import CliRunner

from orchestrator.configfile import config_from_dict
from orchestrator.ops.claude_env import claude_environment
from orchestrator.ops.cli import _one_liner_config, main
from testkit.engine import FakeEngine


def test_check_config_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nport = "x"\n[[backends]]\nname = "p"\nurl = "ftp://h"\n')
    result = CliRunner().invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 1
    assert "gateway.port" in result.output and "backends[0].url" in result.output


def test_check_config_says_whether_the_save_budget_fits_the_disk(tmp_path):
    """16 GiB of saves by default, on whatever disk the folder is: check-config compares the two."""
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    backend = f'[[backends]]\nname = "p"\nurl = "http://127.0.0.1:8080"\nkv_save_dir = "{tmp_path}"\n'
    good.write_text(backend + "kv_save_max_bytes = 1000\n")
    bad.write_text(backend + "kv_save_max_bytes = 1000000000000000000\n")
    said = CliRunner().invoke(main, ["check-config", str(good)]).output
    assert f"backend p saves: {tmp_path} (" in said and "kv_save_max_bytes (1,000) fits beside" in said
    said = CliRunner().invoke(main, ["check-config", str(bad)]).output
    assert "is more than this disk can give the saves" in said


def test_one_liner_with_background_url():
    c = _one_liner_config("http://127.0.0.1:8080", 2, "http://127.0.0.1:8081")
    assert c.backends[0].slots == 2 and c.background_backend.url == "http://127.0.0.1:8081"
    assert _one_liner_config("http://127.0.0.1:8080", 1, "synthetic").background_backend is None


def test_small_model_name_must_be_routed_as_background():
    import pytest

    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="claude.small_model"):
        config_from_dict({"claude": {"small_model": "tiny"}})


def test_claude_environment_from_health():
    config = config_from_dict({"backends": [{"name": "p", "url": "http://h:1", "max_output_tokens": 512}]})
    env = claude_environment(config, {"backends": [{"name": "p", "role": "main", "n_ctx": 65536}]})
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9090"
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "65536" and env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "512"
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "local-haiku" and env["ANTHROPIC_MODEL"] == "local-model"
    # Agents on the main model (the gateway routes them right without it: test_claude_code_agents.py).
    assert env["CLAUDE_CODE_SUBAGENT_MODEL"] == "local-model"
    assert int(env["API_TIMEOUT_MS"]) >= 600_000
    assert "CLAUDE_CODE_MAX_CONTEXT_TOKENS" not in claude_environment(config, {"backends": []})
    # No ahead-of-time compaction below Claude Code's 100000 floor (it would start at a negative or
    # tiny threshold): the gateway's `prompt is too long` makes it compact instead. From the floor up,
    # the real window; never DISABLE_COMPACT, which turns compaction off.
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in env and "DISABLE_COMPACT" not in env
    big = claude_environment(config, {"backends": [{"name": "p", "role": "main", "n_ctx": 131072}]})
    assert big["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == big["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "131072"
    assert "DISABLE_COMPACT" not in big


def test_env_and_claude_say_when_gateway_is_not_running(tmp_path):
    from testkit.servers import free_port

    cfg = tmp_path / "o.toml"
    cfg.write_text(f"[gateway]\nport = {free_port()}\n")
    for cmd in (["env"], ["claude", "-p", "hi"]):
        result = CliRunner().invoke(main, [*cmd, "--config", str(cfg)])
        assert result.exit_code == 1 and "not running" in result.output


async def test_env_prints_exports_for_a_running_gateway(gateway, serve_app, tmp_path):
    url = await serve_app(FakeEngine().app())
    base, _ = await gateway({"backends": [{"name": "primary", "url": url}]})
    port = base.rsplit(":", 1)[1]
    cfg = tmp_path / "o.toml"
    cfg.write_text(f'[gateway]\nport = {port}\n[[backends]]\nname = "primary"\nurl = "{url}"\n')
    result = await asyncio.to_thread(CliRunner().invoke, main, ["env", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert f"export ANTHROPIC_BASE_URL=http://127.0.0.1:{port}" in result.output
    assert "export ANTHROPIC_DEFAULT_HAIKU_MODEL=local-haiku" in result.output
    assert "export CLAUDE_CODE_SUBAGENT_MODEL=local-model" in result.output


def test_serve_refuses_a_non_loopback_bind_without_a_key(monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "gateway.api_key" in result.output and "--open" in result.output


async def test_env_and_status_work_with_a_key_from_the_environment(gateway, serve_app, tmp_path, monkeypatch):
    """`orchestrator env` reaches a keyed gateway and hands Claude Code the key; without it: refused."""
    key = "env-key-0123456789"
    url = await serve_app(FakeEngine().app())
    base, _ = await gateway({"backends": [{"name": "primary", "url": url}], "gateway": {"api_key": key}})
    port = base.rsplit(":", 1)[1]
    cfg = tmp_path / "o.toml"
    cfg.write_text(f'[gateway]\nport = {port}\n[[backends]]\nname = "primary"\nurl = "{url}"\n')
    monkeypatch.setenv("ORCHESTRATOR_API_KEY", key)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["env", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert f"export ANTHROPIC_AUTH_TOKEN={key}" in result.output
    result = await asyncio.to_thread(CliRunner().invoke, main, ["status", "--config", str(cfg)])
    assert "primary" in result.output and "not answering" not in result.output
    monkeypatch.delenv("ORCHESTRATOR_API_KEY")
    result = await asyncio.to_thread(CliRunner().invoke, main, ["env", "--config", str(cfg)])
    assert result.exit_code == 1 and "ORCHESTRATOR_API_KEY" in result.output


def test_dashboard_prints_a_login_link_that_the_gateway_takes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.http.page import Dashboard
    from orchestrator.ops.cli import main

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    key = "secret-key-123456"
    cfg = tmp_path / "o.toml"
    cfg.write_text(f'[gateway]\napi_key = "{key}"\n[[backends]]\nname = "primary"\nurl = "http://127.0.0.1:8080"\n')
    result = CliRunner().invoke(main, ["dashboard", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    url = result.output.split()[1]
    assert url.startswith("http://127.0.0.1:9090/dashboard/login?t=")
    ticket = url.split("t=", 1)[1]
    assert Dashboard(key).take_ticket(ticket) and not Dashboard("other-key-12345").take_ticket(ticket)
