"""Loading local Hugging Face causal LMs, and facts about them every engine needs."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """AutoModelForCausalLM from a local directory; ValueError naming the dir if it fails."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir).is_dir():
        raise ValueError(f"model dir {model_dir} does not exist")
    if not Path(model_dir, "config.json").is_file():
        raise ValueError(f"model dir {model_dir} has no config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, local_files_only=True
        )
    except Exception as error:  # transformers raises many types for unreadable weights
        raise ValueError(f"cannot load a causal LM from {model_dir}: {error}") from error


def output_vocab_size(model: torch.nn.Module) -> int:
    """Size of the logits' last dimension (the LM head rows, else config.vocab_size)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


def context_length(model: torch.nn.Module) -> int:
    """Positions the model can attend over (2**31 when the config does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or 2**31


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """The model's EOS ids (generation config, which may list several) and the tokenizer's."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token: generation could never stop")
    return ids
