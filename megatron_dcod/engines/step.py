"""One optimizer step of the DeepSpeed engine: micro-batches → corrected loss → DeepSpeed.

The loss is `correction.objective.corrected_loss`, unchanged, on the student's log-probs at the
trace tokens (and the teacher's top-k ids). Its normalizer N is the step's, over every
micro-batch and data-parallel rank, as in the Megatron engine: N is formed before the first
backward pass (Σ m from the batches for `tokens`; Σ m·w from a forward pass without gradients
for `weights`, which costs one extra forward per micro-batch), all-reduced, and each
micro-batch's backward runs on Σ m w ℓ · DP / N, since DeepSpeed averages gradients over the
data-parallel ranks (`scale_wrt_gas=False`: no division by the accumulation steps). The
gradient is then exactly ∂(Σ_step m w ℓ / N)/∂θ, whatever the split into micro-batches and ranks.

Differences from the Megatron engine: a micro-batch dropped for a non-finite loss (counted in
the weight metrics) contributes no gradient, but its tokens stay in the `tokens` N, which is
fixed before the forward passes (the Megatron engine removes them); and with dropout in the
model, the extra forward pass of `weights` draws its own dropout masks, so N is Σ m·w of that
pass rather than of the one that backpropagates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction.objective import (
    CorrectedLoss,
    PickedLogprobs,
    corrected_loss,
    picked_ids,
    restricted_to_train_sources,
)

TOTAL_NAMES = ("loss_sum", "normalizer", "base_loss_sum", "tokens")
"""Entries of `StepTotals.sums`: `lm loss` = loss_sum / normalizer, `base loss` = base / tokens."""


@dataclass
class StepTotals:
    """A step's (or an evaluation's) sums over micro-batches and data-parallel ranks."""

    sums: torch.Tensor  # [4] float64, TOTAL_NAMES

    @property
    def lm_loss(self) -> float:
        return float(self.sums[0] / self.sums[1]) if self.sums[1] > 0 else float("nan")

    @property
    def base_loss(self) -> float:
        return float(self.sums[2] / self.sums[3]) if self.sums[3] > 0 else float("nan")


def micro_batch_loss(engine, correction: CorrectionConfig, batch: dict) -> CorrectedLoss:
    """The corrected loss of one micro-batch through the DeepSpeed engine's student."""
    ids = picked_ids(correction, batch)  # [b, s, 1 (+k)]
    logprobs = engine(batch["tokens"], batch["position_ids"], batch["segment_ids"], ids)
    return corrected_loss(correction, PickedLogprobs(logprobs), batch)


def all_reduced(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def step_normalizer(engine, correction: CorrectionConfig, batches: list[dict]) -> torch.Tensor:
    """N of the step, summed over its micro-batches and every data-parallel rank (module doc)."""
    device = batches[0]["loss_mask"].device
    local = torch.zeros((), dtype=torch.float64, device=device)
    if correction.normalization == "tokens":
        for batch in batches:
            local += restricted_to_train_sources(correction, batch)["loss_mask"].double().sum()
    else:
        with torch.no_grad():
            for batch in batches:
                local += micro_batch_loss(engine, correction, batch).normalizer.double()
    return all_reduced(local)


def train_step(engine, correction: CorrectionConfig, batches: list[dict], metrics) -> StepTotals:
    """Forward and backward of every micro-batch of the step, then DeepSpeed's optimizer step
    (it steps at the last micro-batch: its accumulation boundary)."""
    data_parallel = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    normalizer = step_normalizer(engine, correction, batches)
    scale = data_parallel / normalizer.clamp(min=1e-30)  # N = 0: every loss term is 0 as well
    sums = torch.zeros(len(TOTAL_NAMES), dtype=torch.float64, device=normalizer.device)
    for batch in batches:
        result = micro_batch_loss(engine, correction, batch)
        engine.backward(result.loss_sum * scale.to(result.loss_sum.dtype), scale_wrt_gas=False)
        engine.step()
        sums += _totals(result)
        if metrics is not None:
            metrics.add(result.stats)
    return StepTotals(all_reduced(sums))


def evaluate(engine, correction: CorrectionConfig, batches) -> StepTotals:
    """Forward-only sums over the given micro-batches (all ranks), the model in eval mode."""
    engine.eval()
    sums = None
    with torch.no_grad():
        for batch in batches:
            totals = _totals(micro_batch_loss(engine, correction, batch))
            sums = totals if sums is None else sums + totals
    engine.train()
    return StepTotals(all_reduced(sums))


def _totals(result: CorrectedLoss) -> torch.Tensor:
    return torch.stack(
        [
            result.loss_sum.detach().double(),
            result.normalizer.double(),
            result.base_loss_sum.double(),
            result.supervised_tokens.double(),
        ]
    )
