"""What kind of cache a model keeps, read from tiny GGUF files written here with the `gguf` package's
writer (engines/model_cache.py), and asked of llama-server's adapter through a fake /props."""

from __future__ import annotations

import gguf
import pytest

from orchestrator.config import BackendConfig
from orchestrator.engines.llama_server import LlamaServer
from orchestrator.engines.model_cache import CacheKind, of_file, read_header, server_options
from testkit.engine import FakeEngine


def tiny_gguf(path, arch: str, **keys) -> str:
    """A GGUF with only metadata (and a vocabulary array, skipped by the reader)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_token_list([f"t{i}" for i in range(300)])
    for name, value in keys.items():
        if name == "sliding_window":
            w.add_sliding_window(value)
        elif name == "ssm_state_size":
            w.add_ssm_state_size(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("arch,keys,command,kind,restorable", [
    ("llama", {}, "llama-server -m m.gguf", CacheKind.DENSE, True),
    ("gemma3", {"sliding_window": 512}, "llama-server -m m.gguf --cache-ram 0", CacheKind.SLIDING_WINDOW, False),
    ("gemma3", {"sliding_window": 512}, "llama-server -m m.gguf --swa-full", CacheKind.SLIDING_WINDOW, True),
    ("gemma3", {"sliding_window": 512}, None, CacheKind.SLIDING_WINDOW, None),  # not supervised: unknown
    ("lfm2", {}, "llama-server", CacheKind.HYBRID, None),
    ("qwen35", {"ssm_state_size": 16}, "llama-server", CacheKind.HYBRID, None),
    ("mamba", {"ssm_state_size": 16}, "llama-server", CacheKind.RECURRENT, None),
    ("granite", {"ssm_state_size": 16}, "llama-server", CacheKind.HYBRID, None),  # ssm keys: hybrid
], ids=["dense", "swa", "swa-full", "swa-unsupervised", "lfm2", "qwen35", "mamba", "ssm-keys"])
def test_the_kind_and_whether_a_restore_can_work(tmp_path, arch, keys, command, kind, restorable):
    model = of_file(tiny_gguf(tmp_path / "m.gguf", arch, **keys), command)
    assert (model.kind, model.arch, model.restorable) == (kind, arch, restorable)
    if kind is CacheKind.SLIDING_WINDOW:
        assert model.sliding_window == 512
    if restorable is False:
        assert model.why == "sliding-window model without --swa-full"
        assert model.line() == ("sliding_window (512 tokens) gemma3: slot restore cannot work "
                                "(sliding-window model without --swa-full)")


def test_the_header_reader_skips_arrays_and_refuses_what_is_not_a_gguf(tmp_path):
    meta = read_header(tiny_gguf(tmp_path / "m.gguf", "gemma3", sliding_window=1024))
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.attention.sliding_window"] == 1024
    assert "tokenizer.ggml.tokens" not in meta
    (tmp_path / "x.gguf").write_bytes(b"not a model at all")
    bad = of_file(str(tmp_path / "x.gguf"), None)
    assert bad.kind is CacheKind.UNKNOWN and bad.restorable is None and "not readable" in bad.why
    assert of_file(str(tmp_path / "missing.gguf"), None).kind is CacheKind.UNKNOWN


def test_the_servers_options_from_its_command():
    assert server_options(None) == {}
    assert server_options("llama-server -m x") == {"swa_full": False, "ctx_checkpoints": 32, "cache_ram_mib": 8192}
    assert server_options("llama-server --swa-full -ctxcp 4 --cache-ram=0") == {
        "swa_full": True, "ctx_checkpoints": 4, "cache_ram_mib": 0}


async def test_llama_servers_adapter_reads_the_model_props_names(serve_app, upstream, tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf", "gemma3", sliding_window=512)
    url = await serve_app(FakeEngine(props={"model_path": path}).app())
    engine = LlamaServer(BackendConfig(name="b", url=url, command="llama-server -m m.gguf"), upstream)
    model = await engine.model_cache()
    assert model.kind is CacheKind.SLIDING_WINDOW and model.restorable is False and model.model == path
    assert await engine.model_cache() is model  # the same file: not read again
    url = await serve_app(FakeEngine().app())  # no /props
    assert await LlamaServer(BackendConfig(name="c", url=url), upstream).model_cache() is None


def test_status_and_check_config_name_the_models_cache(tmp_path):
    from click.testing import CliRunner

    from orchestrator.ops.cli import main
    from orchestrator.ops.status import kv_lines

    swa = of_file(tiny_gguf(tmp_path / "g.gguf", "gemma3", sliding_window=512), "llama-server")
    health = {"backends": [{"name": "primary", "model_cache": swa.view(),
                            "kv_saves": {"on": False, "off_because": swa.why}}]}
    assert kv_lines(health, 0.0) == ["model cache: primary sliding_window gemma3; "
                                     "slot saves off: sliding-window model without --swa-full"]
    model = swa.model
    (tmp_path / "o.toml").write_text(f'[[backends]]\nname = "primary"\nurl = "http://127.0.0.1:8080"\n'
                                     f'command = "llama-server --model {model} --port 8080"\n')
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "o.toml")]).output
    assert ("backend primary model cache: sliding_window (512 tokens) gemma3: slot restore cannot work "
            "(sliding-window model without --swa-full)") in out
