"""The float64 reference of one DCOD training step, shared by both engines' tests.

Plain HF transformers in float64 with the DCOD weights written out per token, over every trace
of a tiny dataset once: L = Σ m w ℓ / N with N = Σ m w (`weights`) or Σ m (`tokens`), and plain
SGD moves every weight by −lr · ∂L/∂θ.
"""

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.data.trace_format import TraceDataset

TRACES, LR, SCALE, OFFSET, TEMPERATURE = 8, 1.0, 2.0, -1.0, 2.0
"""Traces of the dataset (one global batch, one per row), SGD's lr, and the DCOD s, b, τ."""


def reference_updates(hf_dir: Path, prefix: Path, normalization: str) -> dict[str, torch.Tensor]:
    """−lr · ∂L/∂θ of the float64 HF model over every trace, DCOD weights per token."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    numerator, denominator = 0.0, 0.0
    for trace in TraceDataset(prefix):
        tokens = torch.from_numpy(trace.tokens.astype("int64"))
        logits = model(tokens[None, :-1]).logits[0]  # [T-1, V]
        logp = torch.log_softmax(logits, -1).gather(1, tokens[1:, None])[:, 0]  # log π_θ(y_t)
        for t, supervised in enumerate(trace.loss_mask[1:].tolist()):
            if not supervised:
                continue
            delta = logp[t].item() - float(trace.teacher_logprobs[t + 1])  # Δ_t, a constant
            weight = SCALE / (1 + math.exp(-(delta - OFFSET) / TEMPERATURE))
            numerator = numerator + weight * -logp[t]
            denominator += weight if normalization == "weights" else 1.0
    (numerator / denominator).backward()
    return {name: -LR * param.grad for name, param in model.named_parameters()}
