"""The corrected loss of one micro-batch: L = Σ_t m_t w_t ℓ_t / N (docs/method.md).

The numerator is returned summed; the normalizer N counts what `CorrectionConfig.normalization`
names (supervised tokens, or their weights) and is summed over every micro-batch and
data-parallel rank of the step before dividing (Megatron's per-token-loss mode), so the loss
does not depend on how the global batch is split.

A micro-batch with a non-finite weight, token loss or cached log-prob on any supervised token is
dropped on the device: every term is masked to 0 (`torch.where`, and the cached log-probs are
made finite before the losses use them, so no NaN reaches the backward through the masked
terms either), its tokens leave the normalizer, and the graph stays connected, so every
parameter still receives its (zero) gradient, the gradient hooks of overlapped reduction fire
and pipeline stages exchange their gradients as usual. No host synchronization is involved;
the dropped micro-batches and tokens are counted in the stats.

With the batch's `source` array (who wrote each token: data/sources.py), the stats also hold
per-source sums of the token loss and the weight, and `CorrectionConfig.train_sources` can
restrict the loss to some sources: the others' loss mask is set to 0 before anything else, so
the micro-batch is exactly that of a dataset in which those tokens were not supervised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dcod.config import CorrectionConfig
from megatron_dcod.correction import token_losses, weights
from megatron_dcod.data.sources import SOURCE_CODES, SUPERVISED_SOURCES

LOW_WEIGHT = 0.1
"""Diagnostics count the supervised tokens with w below this."""

WEIGHT_STAT_NAMES = (
    "tokens",
    "w_sum",
    "w_sq_sum",
    "w_low",
    "delta_sum",
    "delta_tokens",
    "dropped_microbatches",
    "dropped_tokens",
)
"""Sums over the kept supervised tokens of the micro-batch, then the count of dropped
micro-batches (0 or 1) and of their supervised tokens."""
SOURCE_STAT_NAMES = tuple(
    f"{quantity}_{source}"
    for source in SUPERVISED_SOURCES
    for quantity in ("tokens", "loss_sum", "w_sum")
)
"""Per source, over its kept supervised tokens: their count, Σ ℓ and Σ w (0 without `source`)."""
STAT_NAMES = WEIGHT_STAT_NAMES + SOURCE_STAT_NAMES
"""Entries of `CorrectedLoss.stats`."""
CACHED_LOGPROBS = ("teacher_logprobs", "ref_logprobs", "teacher_topk_logprobs")
"""Per-token arrays of the batch that come from the dataset (the teacher's and π_0's)."""


@dataclass
class CorrectedLoss:
    """One micro-batch's share of the step loss (all zero, but connected, when dropped)."""

    loss_sum: torch.Tensor  # [] Σ m w ℓ, with gradient
    normalizer: torch.Tensor  # [] Σ m (tokens) or Σ m w (weights), no gradient
    supervised_tokens: torch.Tensor  # [] Σ m over the kept tokens
    base_loss_sum: torch.Tensor  # [] Σ m ℓ, the unweighted loss (diagnostic), no gradient
    stats: torch.Tensor  # [len(STAT_NAMES)] fp64 sums for the weight diagnostics


@dataclass
class PickedLogprobs:
    """A model output that is already the student's log-probs at the ids the loss reads
    (`picked_ids`): the DeepSpeed engine computes them from the HF logits chunk by chunk."""

    logprobs: torch.Tensor  # [b, s, 1 (+k)] with gradient: the trace token (then the top-k ids)


def picked_ids(config: CorrectionConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[b, s, 1 (+k)] vocabulary ids whose student log-probs the loss needs: the trace token,
    then for `kl`/`todi` the teacher's stored top-k."""
    ids = batch["labels"].unsqueeze(-1)
    if config.base_loss != "ce":
        ids = torch.cat([ids, batch["teacher_topk_ids"].to(ids.dtype)], dim=-1)
    return ids.long()


def student_logprobs_and_token_loss(
    config: CorrectionConfig,
    output: torch.Tensor | PickedLogprobs,
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ(y_t) [b, s] detached, ℓ_t [b, s] with gradient) from the model output.

    For `ce` Megatron's output is its per-token cross-entropy [b, s] (log π_θ(y_t) = −ℓ_t, no
    second pass over the logits); for `kl`/`todi` it is the logits [b, s, v/tp]. A
    `PickedLogprobs` output holds the log-probs at `picked_ids` for either base loss.
    """
    if isinstance(output, PickedLogprobs):
        picked = token_losses.at_least_fp32(output.logprobs)  # [b, s, 1 (+k)]
    elif config.base_loss == "ce":
        token_loss = token_losses.at_least_fp32(output)
        return -token_loss.detach(), token_loss
    else:
        picked = token_losses.vocab_parallel_logprobs_at(output, picked_ids(config, batch))
    if config.base_loss == "ce":
        return picked[..., 0].detach(), -picked[..., 0]
    logp_student, logp_student_topk = picked[..., 0].detach(), picked[..., 1:]
    teacher_topk = batch["teacher_topk_logprobs"]
    if config.base_loss == "kl":
        token_loss = token_losses.topk_kl_loss(logp_student_topk, teacher_topk, config.topk_mode)
    else:
        token_loss = token_losses.todi_loss(
            logp_student_topk, teacher_topk, config.topk_mode, config.todi_beta
        )
    return logp_student, token_loss


def token_weights(
    config: CorrectionConfig,
    logp_student: torch.Tensor,
    log_ratio: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """w_t [b, s] of the configured weighting, without gradient; `log_ratio` is Δ_t."""
    loss_mask, segment_ids = batch["loss_mask"], batch["segment_ids"]
    if config.weighting == "sft":
        return torch.ones_like(logp_student)
    if config.weighting == "dft":
        return weights.dft_weights(logp_student)
    if config.weighting == "iw_sft":
        return weights.iw_sft_weights(
            logp_student, batch["ref_logprobs"], loss_mask, segment_ids, config.iw_sft_max_weight
        )
    scoped = weights.scoped_log_ratio(log_ratio, loss_mask, segment_ids, config.scope)
    clip = (config.clip_min, config.clip_max)
    return weights.dcod_weights(scoped, config.temperature, config.offset, config.scale, clip)


def corrected_loss(
    config: CorrectionConfig,
    output: torch.Tensor | PickedLogprobs,
    batch: dict[str, torch.Tensor],
) -> CorrectedLoss:
    """Σ m w ℓ of one micro-batch, its normalizer and weight statistics (see module doc)."""
    batch = restricted_to_train_sources(config, batch)
    loss_mask = token_losses.at_least_fp32(batch["loss_mask"])  # [b, s]
    batch, cached_finite = _with_finite_cached_logprobs(batch)
    logp_student, token_loss = student_logprobs_and_token_loss(config, output, batch)
    log_ratio = None  # [b, s] Δ_t = log π_θ − log π_T, formed once for the weight and the stats
    if "teacher_logprobs" in batch:
        log_ratio = logp_student - batch["teacher_logprobs"].to(logp_student.dtype)
    token_weight = token_weights(config, logp_student, log_ratio, batch)  # [b, s]

    supervised = loss_mask > 0  # [b, s]
    finite = torch.isfinite(token_weight) & torch.isfinite(token_loss) & cached_finite
    kept_batch = (finite | ~supervised).all()  # [] bool: False drops the whole micro-batch
    kept = supervised & kept_batch  # [b, s]
    weight = torch.where(kept, token_weight, 0.0)
    kept_loss = torch.where(kept, token_loss, 0.0)  # a dropped term's gradient is exactly 0
    kept_mask = kept.to(loss_mask.dtype)
    loss_sum = (weight * kept_loss).sum()
    normalizer = kept_mask.sum() if config.normalization == "tokens" else weight.sum()
    if log_ratio is not None:
        log_ratio = torch.where(kept, log_ratio, 0.0)
    stats = [weight_stats(weight, log_ratio, kept_mask, loss_mask, kept_batch)]
    stats.append(source_stats(weight, kept_loss, kept_mask, batch.get("source")))
    return CorrectedLoss(
        loss_sum=loss_sum,
        normalizer=normalizer.detach(),
        supervised_tokens=kept_mask.sum(),
        base_loss_sum=kept_loss.detach().sum(),
        stats=torch.cat(stats),
    )


def restricted_to_train_sources(
    config: CorrectionConfig, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The batch with loss mask 0 on the tokens whose source is not in `config.train_sources`
    (comparisons with Python ints: nothing is copied to the device)."""
    if not config.restricts_sources:
        return batch
    if "source" not in batch:
        raise ValueError("dcod train sources need the batch's `source` array (preflight)")
    source = batch["source"]  # [b, s] uint8
    trained = torch.zeros_like(source, dtype=torch.bool)  # [b, s]
    for name in config.train_sources:
        trained |= source == SOURCE_CODES[name]
    return batch | {"loss_mask": batch["loss_mask"] * trained}


def _with_finite_cached_logprobs(
    batch: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the batch with every non-finite cached log-prob replaced by 0, [b, s] True where all of
    a token's cached log-probs are finite). The losses then compute on finite inputs only: a
    NaN or −inf reaching them would turn the zero gradient of a dropped term into NaN (0 · ∞)."""
    finite_tokens = torch.ones_like(batch["loss_mask"], dtype=torch.bool)  # [b, s]
    clean = dict(batch)
    for name in CACHED_LOGPROBS:
        if name in batch:
            finite = torch.isfinite(batch[name])  # [b, s] or [b, s, k]
            clean[name] = torch.where(finite, batch[name], 0)
            finite_tokens &= finite.all(-1) if finite.dim() == 3 else finite
    return clean, finite_tokens


def weight_stats(
    weight: torch.Tensor,
    log_ratio: torch.Tensor | None,
    kept_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    kept_batch: torch.Tensor,
) -> torch.Tensor:
    """Sums named by WEIGHT_STAT_NAMES, fp64 [8]; `weight`, `log_ratio` are 0 off `kept_mask`."""
    weight, mask = weight.detach().double(), kept_mask.double()
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    dropped = (~kept_batch).double()  # [] 1.0 when the micro-batch was dropped
    return torch.stack(
        [
            mask.sum(),
            weight.sum(),
            (weight * weight).sum(),
            ((weight < LOW_WEIGHT).double() * mask).sum(),
            zero if log_ratio is None else log_ratio.double().sum(),
            zero if log_ratio is None else mask.sum(),
            dropped,
            dropped * loss_mask.double().sum(),
        ]
    )


def source_stats(
    weight: torch.Tensor,
    kept_loss: torch.Tensor,
    kept_mask: torch.Tensor,
    source: torch.Tensor | None,
) -> torch.Tensor:
    """Sums named by SOURCE_STAT_NAMES, fp64 [9]; `weight`, `kept_loss` are 0 off `kept_mask`."""
    if source is None:
        return torch.zeros(len(SOURCE_STAT_NAMES), dtype=torch.float64, device=kept_mask.device)
    of_source = torch.stack(
        [source == SOURCE_CODES[name] for name in SUPERVISED_SOURCES], dim=-1
    ).double()  # [b, s, n_sources]
    quantities = torch.stack(
        [kept_mask.double(), kept_loss.detach().double(), weight.detach().double()], dim=-1
    )  # [b, s, 3]
    sums = of_source.flatten(0, 1).T @ quantities.flatten(0, 1)  # [n_sources, 3]
    return sums.reshape(-1)


def summarize_stats(stats: torch.Tensor, per_source: bool = False) -> dict[str, float]:
    """The diagnostics of docs/method.md from summed stats: mean/std of w, ESS, low-w share,
    mean Δ, with `per_source` the mean token loss and weight of each source (NaN for a source
    without tokens), and the dropped micro-batches and tokens."""
    values = stats.tolist()
    tokens, w_sum, w_sq_sum, w_low, delta_sum, delta_tokens, dropped, dropped_tokens = values[:8]
    n = max(tokens, 1.0)
    mean = w_sum / n
    summary = {
        "w mean": mean,
        "w std": max(w_sq_sum / n - mean * mean, 0.0) ** 0.5,
        "w ess": w_sum * w_sum / (n * w_sq_sum) if w_sq_sum > 0 else 0.0,  # (Σw)² / (n Σw²)
        "w<0.1 frac": w_low / n,
        "delta mean": delta_sum / delta_tokens if delta_tokens > 0 else float("nan"),
    }
    for index, name in enumerate(SUPERVISED_SOURCES if per_source else ()):
        count, loss_sum, source_w_sum = values[8 + 3 * index : 11 + 3 * index]
        summary[f"base loss {name}"] = loss_sum / count if count > 0 else float("nan")
        summary[f"w mean {name}"] = source_w_sum / count if count > 0 else float("nan")
    summary["dropped_microbatches"] = int(dropped)
    summary["dropped_tokens"] = int(dropped_tokens)
    return summary
