"""Token losses ℓ_t that the corrective weights multiply (docs/method.md), vocab-parallel.

`ce` is the per-token cross-entropy Megatron already computes (vocab-parallel, fused with the
output layer); this module only adds what needs the logits: log-probs of chosen ids under a
vocabulary split across tensor-parallel ranks, token-level KD from the teacher's stored top-k,
and ToDi. Logits are `[b, s, v/tp]`; every function returns per-token values `[b, s]`.

Sharded log-softmax: each TP rank holds the logits of vocabulary ids [start, start + v/tp). The
shards' normalizers and picked logits are all-reduced across ranks; the all-reduce's backward
is the identity because the loss is replicated on every TP rank (each rank's gradient of the
reduced value is the same number), the argument Megatron's vocab-parallel cross-entropy
relies on.
"""

from __future__ import annotations

import torch

from megatron_dcod.config import TOPK_MODES


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 → fp32 for the loss math; fp32 and fp64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _tensor_parallel_size_and_rank() -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group; (1, 0) outside a model-parallel run."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


def _tp_all_reduce(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce over the tensor-parallel group; backward is the identity (see module doc)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if _tensor_parallel_size_and_rank()[0] == 1:
        return tensor
    if op == torch.distributed.ReduceOp.SUM:  # reduces in place: never a tensor autograd saved
        return reduce_from_tensor_model_parallel_region(tensor.clone())
    reduced = tensor.detach().clone()  # a max needs no gradient: it only stabilizes exp()
    torch.distributed.all_reduce(
        reduced, op=op, group=parallel_state.get_tensor_model_parallel_group()
    )
    return reduced


def vocab_parallel_logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] over the full (TP-sharded) vocabulary, in fp32, with gradient.

    logits [b, s, v/tp]; ids [b, s, k] global vocabulary ids → [b, s, k]. Each rank takes the
    log Σexp of its shard (torch.logsumexp keeps no exp tensor for the backward: one fp32 copy
    of the shard is all that lives on) and the shards' values are combined stably.
    """
    logits = at_least_fp32(logits)  # [b, s, v/tp]
    shard_normalizer = torch.logsumexp(logits, -1, keepdim=True)  # [b, s, 1] over this shard
    tensor_parallel, rank = _tensor_parallel_size_and_rank()
    if tensor_parallel == 1:
        log_normalizer = shard_normalizer
    else:  # log Σ_r exp(n_r) = m + log Σ_r exp(n_r − m), m = max_r n_r
        largest = _tp_all_reduce(shard_normalizer.detach(), torch.distributed.ReduceOp.MAX)
        log_normalizer = largest + _tp_all_reduce((shard_normalizer - largest).exp()).log()
    local_ids = ids - rank * logits.shape[-1]  # [b, s, k] ids within this shard
    on_this_rank = (local_ids >= 0) & (local_ids < logits.shape[-1])
    picked = logits.gather(-1, local_ids.clamp(0, logits.shape[-1] - 1)) * on_this_rank
    return _tp_all_reduce(picked) - log_normalizer  # [b, s, k]


def _topk_distributions(
    logp_student_topk: torch.Tensor, teacher_topk_logprobs: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the support of the top-k losses.

    `logp_student_topk` [b, s, k] are the student's full-vocabulary log-probs of the teacher's k
    ids; they are never renormalized, so the losses see the mass the student puts elsewhere.

    renormalize: p̂_T = p_T / Σ_S p_T on the k ids; the student as given → [b, s, k]
    tail:        the k ids plus one bucket holding each side's remaining mass → [b, s, k+1]
    """
    teacher = teacher_topk_logprobs.to(logp_student_topk.dtype)
    if mode == "renormalize":
        return teacher - teacher.logsumexp(-1, keepdim=True), logp_student_topk
    if mode != "tail":
        raise ValueError(f"unknown top-k mode {mode!r}: one of {TOPK_MODES}")

    def with_tail(logp: torch.Tensor) -> torch.Tensor:
        tail = torch.log1p(-logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))  # log(1 − Σp)
        return torch.cat([logp, tail], dim=-1)

    return with_tail(teacher), with_tail(logp_student_topk)


def topk_kl_loss(
    logp_student_topk: torch.Tensor, teacher_topk_logprobs: torch.Tensor, mode: str
) -> torch.Tensor:
    """Token-level KD: forward KL(p_T ‖ q_θ) = Σ_v p_T(v) (log p_T(v) − log q_θ(v)) → [b, s].

    Over the teacher's stored top-k S (docs/method.md, "Token-level KD"); `mode` picks the
    support. With `renormalize` this is the KL from the renormalized teacher p̂_T (zero outside
    S) to the student's full distribution q_θ: KL(p̂_T ‖ q̂_θ) − log Σ_S q_θ, where q̂_θ is q_θ
    renormalized over S. It is ≥ 0, and 0 only when q_θ equals p̂_T on S with no mass elsewhere.
    """
    logp_teacher, logp_student = _topk_distributions(logp_student_topk, teacher_topk_logprobs, mode)
    return (logp_teacher.exp() * (logp_teacher - logp_student)).sum(-1)


def todi_loss(
    logp_student_topk: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mode: str,
    beta: float = 1.0,
) -> torch.Tensor:
    """ToDi (arXiv 2505.16297, Eq. 5–6), per token over the stored top-k → [b, s]:

    α_v = sg σ(β log(p_T(v)/q_θ(v)));  Σ_v α_v p_T log(p_T/q_θ) + (1−α_v) q_θ log(q_θ/p_T)

    Each term is ≥ 0 for β > 0 (both factors change sign where p_T = q_θ), so the loss is 0 only
    when q_θ equals the (renormalized) teacher on S, which leaves it no mass elsewhere.
    """
    logp_teacher, logp_student = _topk_distributions(logp_student_topk, teacher_topk_logprobs, mode)
    log_ratio = logp_teacher - logp_student  # [b, s, k]: log(p_T / q_θ)
    alpha = torch.sigmoid(beta * log_ratio.detach())
    forward_kl = logp_teacher.exp() * log_ratio
    reverse_kl = logp_student.exp() * -log_ratio
    return (alpha * forward_kl + (1 - alpha) * reverse_kl).sum(-1)
