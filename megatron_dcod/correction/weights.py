"""Per-token corrective weights (docs/method.md): pure tensor math, one function per equation.

Every function takes detached student log-probs and returns weights without gradient: the
weights multiply a token loss, they are never trained through (the sg[·] of the equations).

Shapes: `[b, s]` is one micro-batch of packed sequences. `segment_ids` [b, s] numbers the traces
of the micro-batch: unique across rows, each run of equal ids one trace, and every id below b·s
(`training/batch.py::next_batch` numbers them 0, 1, ...). `loss_mask` [b, s] is 1 on supervised
targets. Scopes that average over a trace (prefix, sequence, iw-SFT) only average over its
supervised tokens.
"""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Σ of `values` [b, s] over each trace, broadcast back to its tokens: [b, s]."""
    flat_ids = segment_ids.reshape(-1)  # [b*s]; every id < b*s, so no host sync for the size
    sums = torch.zeros(flat_ids.numel(), dtype=values.dtype, device=values.device)
    sums.index_add_(0, flat_ids, values.reshape(-1))  # [b*s], one slot per possible trace
    return sums[flat_ids].view_as(values)


def segment_cumsum(values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Inclusive running Σ of `values` [b, s] within each trace (traces are contiguous runs)."""
    flat = values.reshape(-1).double()  # [b*s]; float64 so long runs do not lose precision
    running = flat.cumsum(0)  # [b*s], crosses trace boundaries
    flat_ids = segment_ids.reshape(-1)
    starts = torch.ones_like(flat_ids, dtype=torch.bool)
    starts[1:] = flat_ids[1:] != flat_ids[:-1]  # first token of each trace
    positions = torch.arange(len(flat), device=flat.device)
    trace_start = torch.cummax(torch.where(starts, positions, 0), 0).values  # [b*s]
    before_trace = (running - flat)[trace_start]  # Σ of everything before the trace
    return (running - before_trace).to(values.dtype).view_as(values)


def scoped_log_ratio(
    log_ratio: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor, scope: str
) -> torch.Tensor:
    """Δ seen by the DCOD weight of each token, for the ratio's scope (docs/method.md, DCOD).

    token:    Δ_t itself
    prefix:   mean of Δ over the supervised tokens of y_≤t (running mean within the trace)
    sequence: mean of Δ over the supervised tokens of the whole trace
    """
    if scope == "token":
        return log_ratio
    supervised_ratio = log_ratio * loss_mask  # [b, s], 0 off the mask
    if scope == "prefix":
        total = segment_cumsum(supervised_ratio, segment_ids)
        count = segment_cumsum(loss_mask, segment_ids)
    elif scope == "sequence":
        total = segment_sum(supervised_ratio, segment_ids)
        count = segment_sum(loss_mask, segment_ids)
    else:
        raise ValueError(f"unknown DCOD scope {scope!r}: token, prefix or sequence")
    return total / count.clamp(min=1)


def dcod_weights(
    log_ratio: torch.Tensor,
    temperature: float,
    offset: float,
    scale: float,
    clip: tuple[float | None, float | None] = (None, None),
) -> torch.Tensor:
    """DCOD (arXiv 2605.14071, as reconstructed in docs/method.md):
    w_t = clip(s · σ((Δ_t − b) / τ)), Δ = log π_θ − log π_T, detached."""
    weights = scale * torch.sigmoid((log_ratio.detach() - offset) / temperature)
    low, high = clip
    if low is not None or high is not None:
        weights = weights.clamp(min=low, max=high)
    return weights


def dft_weights(logp_student: torch.Tensor) -> torch.Tensor:
    """DFT (arXiv 2508.05629): w_t = sg(π_θ(y_t | ·)) = exp(log π_θ), detached."""
    return logp_student.detach().exp()


def iw_sft_weights(
    logp_student: torch.Tensor,
    logp_ref: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    max_weight: float,
) -> torch.Tensor:
    """iw-SFT (arXiv 2507.12856): one weight per trace, on all its tokens [b, s].

    w = clamp(exp(mean_t[log π_θ − log π_0]), 0, max_weight), the mean over supervised tokens.
    """
    log_ratio = (logp_student.detach() - logp_ref) * loss_mask  # [b, s]
    mean = segment_sum(log_ratio, segment_ids) / segment_sum(loss_mask, segment_ids).clamp(min=1)
    return mean.exp().clamp(min=0.0, max=max_weight)
