"""Tiny random-weight models built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 160,
               vocab: int = 256) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (q 64, k/v 32 wide) in eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def token_windows(n: int, length: int = 64, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token windows: enough for calibration statistics of the tiny models."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)
