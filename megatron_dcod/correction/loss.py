"""The corrected loss of one micro-batch: L = Σ_t m_t w_t ℓ_t / normalizer (METHOD.md §1).

The numerator is returned summed; the normalizer counts what `CorrectionConfig.normalization`
names (supervised tokens, or their weights) and is summed over every micro-batch and
data-parallel rank of the step before dividing (Megatron's per-token-loss mode), so the loss
does not depend on how the global batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction import losses, weights

LOW_WEIGHT = 0.1
"""Diagnostics count the supervised tokens with w below this (METHOD.md §2, diagnostics)."""

STAT_NAMES = ("tokens", "w_sum", "w_sq_sum", "w_low", "delta_sum", "delta_tokens")
"""Entries of `CorrectedLoss.stats`: sums over the supervised tokens of the micro-batch."""


@dataclass
class CorrectedLoss:
    """One micro-batch's share of the step loss."""

    loss_sum: torch.Tensor  # [] Σ m w ℓ, with gradient
    normalizer: torch.Tensor  # [] fp32 Σ m (tokens) or Σ m w (weights), no gradient
    base_loss_sum: torch.Tensor  # [] Σ m ℓ, the unweighted loss (diagnostic), no gradient
    stats: torch.Tensor  # [len(STAT_NAMES)] fp64 sums for the weight diagnostics


def student_logprobs_and_token_loss(
    config: CorrectionConfig, output: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ(y_t) [b, s] detached, ℓ_t [b, s] with gradient) from the model output.

    For `ce` the output is Megatron's per-token cross-entropy [b, s] (log π_θ(y_t) = −ℓ_t, no
    second pass over the logits); for `kl`/`todi` it is the logits [b, s, v/tp].
    """
    if config.base_loss == "ce":
        token_loss = losses.at_least_fp32(output)
        return -token_loss.detach(), token_loss
    picked_ids = torch.cat([batch["labels"].unsqueeze(-1), batch["teacher_topk_ids"]], dim=-1)
    picked = losses.vocab_parallel_logprobs_at(output, picked_ids.long())  # [b, s, 1+k]
    logp_student, logp_student_topk = picked[..., 0].detach(), picked[..., 1:]
    if config.base_loss == "kl":
        token_loss = losses.topk_kl_loss(
            logp_student_topk, batch["teacher_topk_logprobs"], config.topk_mode
        )
    else:
        token_loss = losses.todi_loss(
            logp_student_topk, batch["teacher_topk_logprobs"], config.topk_mode, config.todi_beta
        )
    return logp_student, token_loss


def token_weights(
    config: CorrectionConfig, logp_student: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """w_t [b, s] of the configured weighting, without gradient."""
    loss_mask, segment_ids = batch["loss_mask"], batch["segment_ids"]
    if config.weighting == "sft":
        return torch.ones_like(logp_student)
    if config.weighting == "dft":
        return weights.dft_weights(logp_student)
    if config.weighting == "iw_sft":
        return weights.iw_sft_weights(
            logp_student, batch["ref_logprobs"], loss_mask, segment_ids, config.iw_sft_max_weight
        )
    log_ratio = logp_student - batch["teacher_logprobs"]  # [b, s] Δ_t
    scoped = weights.scoped_log_ratio(log_ratio, loss_mask, segment_ids, config.scope)
    clip = (config.clip_min, config.clip_max)
    return weights.dcod_weights(scoped, config.temperature, config.offset, config.scale, clip)


def corrected_loss(
    config: CorrectionConfig, output: torch.Tensor, batch: dict[str, torch.Tensor]
) -> CorrectedLoss:
    """Σ m w ℓ of one micro-batch, its normalizer and weight statistics."""
    loss_mask = losses.at_least_fp32(batch["loss_mask"])  # [b, s]
    logp_student, token_loss = student_logprobs_and_token_loss(config, output, batch)
    token_weight = token_weights(config, logp_student, batch) * loss_mask  # [b, s]
    loss_sum = (token_weight * token_loss).sum()
    normalizer = loss_mask.sum() if config.normalization == "tokens" else token_weight.sum()
    return CorrectedLoss(
        loss_sum=loss_sum,
        normalizer=normalizer.detach(),
        base_loss_sum=(token_loss.detach() * loss_mask).sum(),
        stats=weight_stats(token_weight, logp_student, loss_mask, batch),
    )


def weight_stats(
    token_weight: torch.Tensor,
    logp_student: torch.Tensor,
    loss_mask: torch.Tensor,
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Sums named by STAT_NAMES over the supervised tokens, fp64 [6]."""
    weight, mask = token_weight.detach().double(), loss_mask.double()
    if "teacher_logprobs" in batch:
        delta = (logp_student.double() - batch["teacher_logprobs"].double()) * mask
        delta_sum, delta_tokens = delta.sum(), mask.sum()
    else:
        delta_sum = delta_tokens = torch.zeros((), dtype=torch.float64, device=mask.device)
    return torch.stack(
        [
            mask.sum(),
            weight.sum(),
            (weight * weight).sum(),
            ((weight < LOW_WEIGHT).double() * mask).sum(),
            delta_sum,
            delta_tokens,
        ]
    )


def summarize_stats(stats: torch.Tensor) -> dict[str, float]:
    """Diagnostics of METHOD.md §2 from summed stats: mean/std of w, ESS, low-w share, mean Δ."""
    tokens, w_sum, w_sq_sum, w_low, delta_sum, delta_tokens = stats.tolist()
    n = max(tokens, 1.0)
    mean = w_sum / n
    return {
        "w mean": mean,
        "w std": max(w_sq_sum / n - mean * mean, 0.0) ** 0.5,
        "w ess": w_sum * w_sum / (n * w_sq_sum) if w_sq_sum > 0 else 0.0,  # (Σw)² / (n Σw²)
        "w<0.1 frac": w_low / n,
        "delta mean": delta_sum / delta_tokens if delta_tokens > 0 else float("nan"),
    }
