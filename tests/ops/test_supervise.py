"""supervisord runs the stack: its configuration rendered (the real crashes:
tests/real/test_supervise_real.py)."""

from pathlib import Path

import pytest

from orchestrator.configfile import config_from_dict, load_config
from orchestrator.ops import supervise

ROOT = Path(__file__).resolve().parents[2]


def test_render_has_every_program_with_restart_policy_and_absolute_paths(tmp_path):
    config = config_from_dict({"backends": [
        {"name": "primary", "url": "http://127.0.0.1:8080", "start_seconds": 7,
         "command": "{llama_server} --model /m/GLM-5.gguf --port {port} --ctx-size 65536 --parallel 1"},
        {"name": "remote", "url": "https://api.example.test"}]})
    paths = supervise.StackPaths(tmp_path)
    text = supervise.render(config, tmp_path / "o.toml", paths, supervise.Programs("/opt/llama server"))
    assert "[program:llama-primary]" in text and "[program:gateway]" in text
    assert "[program:llama-remote]" not in text  # not ours to run
    assert "command='/opt/llama server' --model /m/GLM-5.gguf --port 8080 --ctx-size 65536" in text
    for line in ("autorestart=true", "stopasgroup=true", "killasgroup=true", "startsecs=7"):
        assert line in text
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("file", "logfile", "pidfile", "directory", "childlogdir")):
            assert value.startswith("/"), line
    assert f"serverurl=unix://{paths.socket}" in text


def test_render_escapes_percent_and_names_unknown_placeholders(tmp_path):
    ok = config_from_dict({"backends": [{"name": "p", "url": "http://h:1", "command": "x --fmt 100%"}]})
    assert "command=x --fmt 100%%" in supervise.render(ok, tmp_path / "c", supervise.StackPaths(tmp_path),
                                                        supervise.Programs(None))
    bad = config_from_dict({"backends": [{"name": "p", "url": "http://h:1", "command": "{nope} x"}]})
    with pytest.raises(supervise.SuperviseError, match="unknown placeholder"):
        supervise.render(bad, tmp_path / "c", supervise.StackPaths(tmp_path), supervise.Programs(None))


def test_render_runs_a_saving_sliding_window_model_with_swa_full(tmp_path):
    from testkit.models import GEMMA_SHAPE, tiny_gguf

    model = tiny_gguf(tmp_path / "g.gguf", "gemma3", **GEMMA_SHAPE)
    command = f"{{llama_server}} --model {model} --port {{port}} -c 8192"
    for extra, runs in (({}, True), ({"kv_swa_full": False}, False), ({"kv_save": False}, False)):
        config = config_from_dict({"backends": [{"name": "p", "url": "http://127.0.0.1:9", "command": command,
                                                 **extra}]})
        text = supervise.render(config, tmp_path / "c", supervise.StackPaths(tmp_path), supervise.Programs("/l"))
        assert (f"--model {model} --port 9 -c 8192 --swa-full" in text) is runs, extra


def test_default_stack_config_is_valid_and_renders():
    config = load_config(ROOT / "deploy" / "orchestrator.toml")
    text = supervise.render(config, ROOT / "deploy" / "orchestrator.toml",
                            supervise.StackPaths(ROOT), supervise.Programs("/bin/llama-server"))
    assert supervise.default_model() in text and "--port 8080" in text


# ---- real supervisord, real llama-server -------------------------------------------------------


def test_a_split_runs_its_workers_on_this_machine_before_its_head(tmp_path):
    config = config_from_dict({"backends": [
        {"name": "big", "url": "http://127.0.0.1:8080", "rpc_workers": ["127.0.0.1:50052", "[::1]:50053", "gpu2:50052"],
         "command": "{llama_server} --model /m/GLM-5.gguf --port {port}"}]})
    text = supervise.render(config, tmp_path / "o.toml", supervise.StackPaths(tmp_path),
                            supervise.Programs("/l/llama-server", rpc_server="/l/ggml-rpc-server"))
    assert "--rpc '127.0.0.1:50052,[::1]:50053,gpu2:50052'" in text
    assert "[program:rpc-big-0]\ncommand=/l/ggml-rpc-server -H 127.0.0.1 -p 50052" in text
    assert "[program:rpc-big-1]\ncommand=/l/ggml-rpc-server -H '[::1]' -p 50053" in text
    assert "[program:rpc-big-2]" not in text  # another machine's worker is run there
    worker = text[text.index("[program:rpc-big-0]"):].split("\n\n")[0]
    assert "priority=5" in worker and "autorestart=true" in worker  # started before the head (10)
    with pytest.raises(supervise.SuperviseError, match="ggml-rpc-server"):
        supervise.render(config, tmp_path / "o.toml", supervise.StackPaths(tmp_path), supervise.Programs("/l/x"))
    with pytest.raises(Exception, match="rpc_workers"):
        config_from_dict({"backends": [{"name": "b", "url": "http://h:1", "rpc_workers": ["nohost"]}]})
