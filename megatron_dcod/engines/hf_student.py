"""The Hugging Face student as the DeepSpeed engine trains it: packed rows in, log-probs out.

`PackedStudent` wraps any `AutoModelForCausalLM`. Attention stays inside each packed trace:
with a flash-attention implementation the per-trace position ids alone mark the traces (the
varlen kernels read them); otherwise a block-diagonal causal 4-D mask built from the segment
ids goes to SDPA or eager attention. The output layer and the log-softmax run in chunks of
`chunk_tokens` tokens, each under activation checkpointing, so one chunk's full-vocabulary fp32
logits live at a time, in the forward and in the backward pass (a 150k vocabulary at 16k tokens
would otherwise hold ~10 GB of them); only the log-probs at the ids the loss reads leave it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
HEAD_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Largest |log-prob| difference between the chunked head and the model's own logits."""


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str | None:
    """flash_attention_2 for bf16/fp16 on a GPU with flash-attn installed; else transformers'
    default (SDPA where the architecture supports it)."""
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def load_student(
    hf_model: str | Path, dtype: torch.dtype, device: torch.device, zero3_config: dict | None
) -> Any:
    """The HF causal LM of `hf_model` in `dtype`. With a ZeRO-3 DeepSpeed config its weights
    are partitioned over the ranks as they load (transformers' DeepSpeed integration, which
    reads the config while `from_pretrained` runs), so no rank holds the whole model. The
    integration's global is cleared afterwards on every rank at once: left to the garbage
    collector, a later load in the same process could partition on one rank and not another."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    zero3 = HfDeepSpeedConfig(zero3_config) if zero3_config is not None else None  # noqa: F841
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hf_model, dtype=dtype, attn_implementation=attention_implementation(device, dtype)
        )
    finally:
        unset_hf_deepspeed_config()
    return model


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype, boolean: bool):
    """[b, 1, s, s] attention mask: token i sees token j ≤ i of its own segment. Boolean
    (True: attend) for SDPA, else additive (0 or the dtype's lowest value) for eager."""
    seq = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    allowed = same & torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = allowed[:, None]  # [b, 1, s, s]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def head_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """The transforms some families apply to the output layer's logits, as their HF forward
    does: Gemma's final soft-cap, Granite's divisor, Cohere's multiplier."""
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    return logits


def _logprobs_at(hidden, ids, head, config) -> torch.Tensor:
    logits = head_logits(config, head(hidden)).float()  # [n, v]
    return logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)  # [n, k]


def chunked_logprobs_at(
    hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, chunk_tokens: int, config
) -> torch.Tensor:
    """log softmax(head(hidden))[ids] in fp32: hidden [b, s, h], ids [b, s, k] → [b, s, k],
    `chunk_tokens` tokens at a time, each chunk recomputed in the backward pass."""
    rows, seq, width = hidden.shape
    flat_hidden, flat_ids = hidden.reshape(rows * seq, width), ids.reshape(rows * seq, -1)
    pieces = [
        checkpoint(
            _logprobs_at,
            flat_hidden[start : start + chunk_tokens],
            flat_ids[start : start + chunk_tokens],
            head,
            config,
            use_reentrant=False,
        )
        for start in range(0, rows * seq, chunk_tokens)
    ]
    return torch.cat(pieces).view(rows, seq, -1)


class PackedStudent(torch.nn.Module):
    """forward(tokens, position_ids, segment_ids, ids) → log-probs at `ids` [b, s, k]."""

    def __init__(self, causal_lm: Any, chunk_tokens: int):
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens

    @property
    def attention(self) -> str:
        return self.causal_lm.config._attn_implementation

    def forward(self, tokens, position_ids, segment_ids, ids) -> torch.Tensor:
        base = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        rows, seq = tokens.shape
        if self.attention in FLASH_IMPLEMENTATIONS:  # the position ids mark the traces; the
            tokens, position_ids, mask = tokens.view(1, -1), position_ids.view(1, -1), None
            # varlen path reads them from one row only: the micro-batch as [1, b·s]
        else:
            mask = block_causal_mask(segment_ids, base.dtype, boolean=self.attention == "sdpa")
        hidden = base(
            input_ids=tokens, position_ids=position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state.view(
            rows, seq, -1
        )  # [b, s, h]
        head = self.causal_lm.get_output_embeddings()
        return chunked_logprobs_at(hidden, head, ids, self.chunk_tokens, self.causal_lm.config)


def check_head(student: PackedStudent, vocab_size: int, device: torch.device) -> None:
    """Refuse an architecture whose logits the chunked head does not reproduce (a transform
    `head_logits` does not know): one short sequence through both paths must agree."""
    tokens = torch.arange(8, device=device).remainder(vocab_size)[None]  # [1, 8]
    positions = torch.arange(8, device=device)[None]
    ids = tokens.roll(-1, 1)[..., None]  # [1, 8, 1]
    with torch.no_grad():
        chunked = student(tokens, positions, torch.zeros_like(tokens), ids)[..., 0]
        logits = student.causal_lm(input_ids=tokens, position_ids=positions).logits.float()
        reference = logits.log_softmax(-1).gather(-1, ids)[..., 0]
    gap = float((chunked - reference).abs().max())
    dtype = student.causal_lm.dtype
    if not gap <= HEAD_CHECK_TOLERANCE.get(dtype, 5e-2):
        raise ValueError(
            f"{student.causal_lm.config.model_type}: the engine's output layer differs from "
            f"the model's own logits by {gap:.3g} (an output transform megatron_dcod/engines/"
            "hf_student.py:head_logits does not apply)"
        )
