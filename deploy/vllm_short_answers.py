"""A vLLM logits processor for the embedded SmolLM2-135M, as deploy/short-answers.gbnf is llama-server's
grammar for it: under Claude Code's long system prompt the tiny model rarely emits its end token, and
Claude Code fails a turn that hits max_tokens. This ends every answer after its first sentence, or after
MAX_TOKENS tokens: each answer is one short sentence that ends. Not for a real model.

    PYTHONPATH=deploy vllm serve ... --logits-processors vllm_short_answers:ShortAnswers
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

MAX_TOKENS = 48


class ShortAnswers(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.eos = tokenizer.eos_token_id
        # Tokens whose text ends a sentence.
        self.ends = {i for i in range(len(tokenizer))
                     if tokenizer.decode([i]).rstrip().endswith((".", "!", "?"))}

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        def short(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if output_ids and (output_ids[-1] in self.ends or len(output_ids) >= MAX_TOKENS):
                eos = logits[self.eos].clone()
                logits.fill_(float("-inf"))
                logits[self.eos] = eos if torch.isfinite(eos) else 0.0
            return logits
        return short
