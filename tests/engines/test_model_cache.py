"""What kind of cache a model keeps, read from tiny GGUF files written here with the `gguf` package's
writer (engines/model_cache.py), and asked of llama-server's adapter through a fake /props."""

from __future__ import annotations

import pytest

from orchestrator.config import BackendConfig
from orchestrator.engines.llama_server import LlamaServer
from orchestrator.engines.model_cache import CacheKind, of_file, read_header, server_options
from orchestrator.kv.restorable import RestoreWatch
from testkit.engine import FakeEngine
from testkit.models import GEMMA_SHAPE, tiny_gguf


@pytest.mark.parametrize("arch,keys,command,kind,restorable", [
    ("llama", {}, "llama-server -m m.gguf", CacheKind.DENSE, True),
    ("gemma3", {"sliding_window": 512}, "llama-server -m m.gguf --cache-ram 0", CacheKind.SLIDING_WINDOW, False),
    ("gemma3", {"sliding_window": 512}, "llama-server -m m.gguf --swa-full", CacheKind.SLIDING_WINDOW, True),
    ("gemma3", {"sliding_window": 512}, None, CacheKind.SLIDING_WINDOW, None),  # not supervised: unknown
    ("lfm2", {}, "llama-server --cache-ram 0", CacheKind.HYBRID, None),
    ("qwen35", {"ssm_state_size": 16}, "llama-server -cram 0", CacheKind.HYBRID, None),
    ("qwen35", {"ssm_state_size": 16}, "llama-server", CacheKind.HYBRID, False),  # the RAM cache serves
    ("qwen35", {"ssm_state_size": 16}, None, CacheKind.HYBRID, None),  # not supervised: measured
    ("mamba", {"ssm_state_size": 16}, "llama-server --cache-ram=0", CacheKind.RECURRENT, None),
    ("granite", {"ssm_state_size": 16}, "llama-server -cram 0", CacheKind.HYBRID, None),  # ssm keys: hybrid
], ids=["dense", "swa", "swa-full", "swa-unsupervised", "lfm2", "qwen35", "qwen35-ram-cache", "qwen35-unsupervised",
        "mamba", "ssm-keys"])
def test_the_kind_and_whether_a_restore_can_work(tmp_path, arch, keys, command, kind, restorable):
    model = of_file(tiny_gguf(tmp_path / "m.gguf", arch, **keys), command)
    assert (model.kind, model.arch, model.restorable) == (kind, arch, restorable)
    if kind is CacheKind.SLIDING_WINDOW:
        assert model.sliding_window == 512
    if restorable is False and kind is CacheKind.HYBRID:
        assert "prompt cache in RAM keeps: that cache serves switches instead" in model.why
    elif restorable is False:
        assert model.why == "sliding-window model without --swa-full"
        assert model.line() == ("sliding_window (512 tokens) gemma3: slot restore cannot work "
                                "(sliding-window model without --swa-full); no slot saves (they cannot pay "
                                "off): to have them, set kv_swa_full = true (a supervised server) or run the "
                                "server with --swa-full")


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
    assert server_options("llama-server -m x") == {
        "swa_full": False, "ctx_checkpoints": 32, "cache_ram_mib": 8192, "ctx_size": 0, "ubatch": 512,
        "cache_type_k": "f16", "cache_type_v": "f16"}
    assert server_options("llama-server --swa-full -ctxcp 4 --cache-ram=0 -c 8192 -ub 256 -ctk Q8_0") == {
        "swa_full": True, "ctx_checkpoints": 4, "cache_ram_mib": 0, "ctx_size": 8192, "ubatch": 256,
        "cache_type_k": "q8_0", "cache_type_v": "f16"}


GEMMA = GEMMA_SHAPE


def test_what_swa_full_costs_agrees_with_llama_servers_own_figures(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf", "gemma3", **GEMMA)
    # llama-server -c 8192 --parallel 1 on Gemma 3 270M logs its SWA cache at 15.00 MiB (1024 cells,
    # 15 layers) and at 120.00 MiB with --swa-full (8192 cells): 105 MiB more.
    model = of_file(path, "llama-server -m g.gguf -c 8192")
    assert model.swa_full_bytes == 105 * 2 ** 20 and model.ctx_size == 8192
    assert model.line().endswith("no slot saves (they cannot pay off): to have them, set kv_swa_full = true (a "
                                 "supervised server) or run the server with --swa-full, which costs 105 MiB more "
                                 "KV at 8,192 tokens")
    assert of_file(path, "x -c 8192 --swa-full").line().endswith("; --swa-full costs 105 MiB more KV at 8,192 tokens")
    # q8_0 keys: 34 bytes a 32 values; a bigger micro-batch keeps more cells either way.
    assert of_file(path, "x -c 8192 -ctk q8_0").swa_full_bytes == int(15 * 7168 * 256 * (34 / 32 + 2))
    assert of_file(path, "x -c 8192 -ub 1024").swa_full_bytes == 15 * (8192 - 1536) * 1024
    # No context on the command: the model's own (2048 here); a window bigger than it costs nothing.
    assert of_file(path, "x").swa_full_bytes == 15 * (2048 - 1024) * 1024
    # A pattern in the GGUF (one flag a layer) wins over llama.cpp's default for the architecture.
    flagged = tiny_gguf(tmp_path / "p.gguf", "gemma3", **GEMMA, swa_pattern=[True, False] * 9)
    assert of_file(flagged, "x -c 8192").swa_full_bytes == 9 * 7168 * 1024
    # An architecture whose pattern is not known: no figure, never a guess.
    assert of_file(tiny_gguf(tmp_path / "u.gguf", "newarch", **GEMMA), "x -c 8192").swa_full_bytes is None


def test_the_gateway_adds_swa_full_to_a_saving_sliding_window_models_command_only(tmp_path):
    from orchestrator.engines.llama_server import command_for

    swa, dense = tiny_gguf(tmp_path / "g.gguf", "gemma3", **GEMMA), tiny_gguf(tmp_path / "d.gguf", "llama")
    saving = BackendConfig(name="b", url="http://127.0.0.1:1", command="x")
    command, model = command_for(saving, f"llama-server -m {swa} -c 8192")
    assert command == f"llama-server -m {swa} -c 8192 --swa-full"
    assert model.swa_full_added and model.restorable is True and "added by the gateway" in model.why
    assert command_for(saving, f"llama-server -m {swa} --swa-full")[0].count("--swa-full") == 1
    assert command_for(saving, f"llama-server -m {dense}")[0] == f"llama-server -m {dense}"
    # Over its memory bound (105 MiB at 8k here, against 100): not added, and saves stay off.
    capped = BackendConfig(name="b", url="http://127.0.0.1:1", command="x", kv_swa_full_max_mib=100)
    command, model = command_for(capped, f"llama-server -m {swa} -c 8192")
    assert command == f"llama-server -m {swa} -c 8192" and model.restorable is False
    assert model.why == "sliding-window model without --swa-full (it would cost more than kv_swa_full_max_mib)"
    assert command_for(capped, f"llama-server -m {swa} -c 4096")[0].endswith("--swa-full")  # 45 MiB there
    for off in (BackendConfig(name="b", url="http://127.0.0.1:1", command="x", kv_swa_full=False),
                BackendConfig(name="b", url="http://127.0.0.1:1", command="x", kv_save=False)):
        command, model = command_for(off, f"llama-server -m {swa}")
        assert command == f"llama-server -m {swa}" and not model.swa_full_added
        assert model.restorable is False


async def test_llama_servers_adapter_reads_the_model_props_names(serve_app, upstream, tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf", "gemma3", sliding_window=512)
    url = await serve_app(FakeEngine(props={"model_path": path}).app())
    engine = LlamaServer(BackendConfig(name="b", url=url, command="llama-server -m m.gguf", kv_swa_full=False),
                         upstream)
    model = await engine.model_cache()
    assert model.kind is CacheKind.SLIDING_WINDOW and model.restorable is False and model.model == path
    assert await engine.model_cache() is model  # the same file: not read again
    # Supervised and saving, with kv_swa_full on (the default): run with --swa-full, which its
    # identity names, so a save made without it is not restored on it.
    engine = LlamaServer(BackendConfig(name="s", url=url, command="llama-server -m m.gguf"), upstream)
    model = await engine.model_cache()
    assert model.swa_full_added and model.restorable is True
    assert (await engine.server_id()).kv_args == "--swa-full"
    # What its process runs wins, where it is read (a model `up` could not read got no --swa-full).
    engine.command_line = "llama-server -m m.gguf --slot-save-path /s"
    model = await engine.model_cache()
    assert not model.swa_full_added and model.restorable is False
    assert (await engine.server_id()).kv_args == ""
    engine.command_line = "llama-server -m m.gguf --slot-save-path /s --swa-full"
    assert (await engine.model_cache()).swa_full_added

    # A server run by someone else, its engine named nowhere: asked as llama-server, it says too.
    from orchestrator.engines.choice import engine_for

    unnamed = engine_for(BackendConfig(name="u", url=url), upstream)
    assert unnamed.kind == "unnamed" and (await unnamed.model_cache()).kind is CacheKind.SLIDING_WINDOW
    url = await serve_app(FakeEngine().app())  # no /props
    assert await LlamaServer(BackendConfig(name="c", url=url), upstream).model_cache() is None


def test_status_and_check_config_name_the_models_cache(tmp_path):
    from click.testing import CliRunner

    from orchestrator.ops.cli import main
    from orchestrator.ops.status import kv_lines

    swa = of_file(tiny_gguf(tmp_path / "g.gguf", "gemma3", sliding_window=512), "llama-server")
    health = {"backends": [{"name": "primary", "model_cache": swa.view(),
                            "kv_saves": {"on": False, "off_because": swa.why}}]}
    assert kv_lines(health, 0.0) == [f"model cache: primary {swa.line()}"]
    # Off by what its restores read back: said beside the model, with what still works.
    health["backends"][0]["model_cache"] = of_file(tiny_gguf(tmp_path / "d.gguf", "llama"), "x").view()
    health["backends"][0]["kv_saves"] = RestoreWatch(measured_off="3 restores in a row read back less than they "
                                                                  "held").view()
    assert kv_lines(health, 0.0) == ["model cache: primary dense llama: slot restore works; slot saves off: "
                                     "3 restores in a row read back less than they held (what still works: "
                                     "the prompt cache in RAM, --cache-ram; a conversation kept on its slot; "
                                     "affinity in a pool)"]
    model = swa.model
    (tmp_path / "o.toml").write_text(f'[[backends]]\nname = "primary"\nurl = "http://127.0.0.1:8080"\n'
                                     f'command = "llama-server --model {model} --port 8080"\n')
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "o.toml")]).output
    assert ("backend primary model cache: sliding_window (512 tokens) gemma3: slot restore works "
            "(--swa-full, added by the gateway: the window's layers keep the whole context)") in out
    with (tmp_path / "o.toml").open("a") as f:
        f.write("kv_swa_full = false\n")
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "o.toml")]).output
    assert ("backend primary model cache: sliding_window (512 tokens) gemma3: slot restore cannot work "
            "(sliding-window model without --swa-full)") in out
