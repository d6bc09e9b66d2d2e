"""Tiny HF models built from a config, saved as local model dirs (no downloads)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def save_tiny_llama(directory: Path, vocab_size: int, seed: int = 0, layers: int = 2) -> Path:
    """A random Llama-family causal LM (GQA: 4 heads, 2 KV heads) saved with save_pretrained."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)
