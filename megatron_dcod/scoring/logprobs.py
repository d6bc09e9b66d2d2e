"""Next-token log-probs and the top-k from TP-sharded logits, in fp32, without gradients.

Each tensor-parallel rank holds the logits of vocabulary ids [rank·v/tp, (rank+1)·v/tp). The
log-prob of a chosen id is `correction.token_losses.vocab_parallel_logprobs_at` (the project's one
sharded log-softmax). The top-k is found vocab-parallel: each rank takes the top-k of its shard,
the candidates of all ranks are gathered (k per rank, not the vocabulary) and merged, and their
log-probs come from the same sharded log-softmax. Ids of Megatron's vocabulary padding (at and
beyond the model's `vocab_size`) get no probability, so the distribution is the HF model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dcod.correction.token_losses import vocab_parallel_logprobs_at


@dataclass
class TokenScores:
    """Scores of the tokens of a packed row; position j describes the row's token j+1."""

    logprobs: torch.Tensor  # [t] float32
    topk_ids: torch.Tensor | None = None  # [t, k] int64, by decreasing log-prob
    topk_logprobs: torch.Tensor | None = None  # [t, k] float32

    def to_host(self) -> "TokenScores":
        """On the CPU, ids as int32."""
        if self.topk_ids is None:
            return TokenScores(self.logprobs.cpu())
        return TokenScores(
            self.logprobs.cpu(), self.topk_ids.to(torch.int32).cpu(), self.topk_logprobs.cpu()
        )


def _tensor_parallel():
    """(group, size, rank) of tensor parallelism; (None, 1, 0) outside a model-parallel run."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None, 1, 0
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


def _without_padding(shard_logits: torch.Tensor, vocab_size: int, rank: int) -> torch.Tensor:
    """fp32 copy of [c, v/tp] with the ids ≥ vocab_size (vocabulary padding) at the lowest
    float (finite, not −inf: the sharded log-softmax multiplies off-shard picks by 0)."""
    shard_logits = shard_logits.to(torch.float32, copy=True)
    first_padded = vocab_size - rank * shard_logits.shape[-1]  # local index of id vocab_size
    if first_padded < shard_logits.shape[-1]:
        shard_logits[:, max(first_padded, 0) :] = torch.finfo(torch.float32).min
    return shard_logits


def _global_topk(shard_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[c, k] global ids of the k largest logits of the whole vocabulary, largest first."""
    group, size, rank = _tensor_parallel()
    local_width = shard_logits.shape[-1]
    values, local_ids = shard_logits.topk(min(k, local_width), dim=-1)  # [c, k'] each
    ids = local_ids + rank * local_width  # [c, k'] global ids
    if size > 1:
        all_values = [torch.empty_like(values) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        values, ids = torch.cat(all_values, dim=-1), torch.cat(all_ids, dim=-1)  # [c, tp·k']
    best = values.topk(k, dim=-1).indices  # [c, k]
    return ids.gather(-1, best)


@torch.no_grad()
def score_next_tokens(
    logits: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int, topk: int, chunk: int
) -> TokenScores:
    """log p(next_tokens[j] | row ≤ j) and the top-k at every position j.

    logits [t, v/tp] (this rank's vocabulary shard, any dtype); next_tokens [t] global ids.
    The fp32 work runs `chunk` positions at a time."""
    _, _, rank = _tensor_parallel()
    logprobs, topk_ids, topk_logprobs = [], [], []
    for start in range(0, logits.shape[0], chunk):
        shard = _without_padding(logits[start : start + chunk], vocab_size, rank)  # [c, v/tp]
        ids = next_tokens[start : start + chunk, None]  # [c, 1]
        if topk:
            ids = torch.cat([ids, _global_topk(shard, topk)], dim=-1)  # [c, 1 + k]
        scores = vocab_parallel_logprobs_at(shard[None], ids[None])[0]  # [c, 1 + k]
        logprobs.append(scores[:, 0])
        if topk:
            topk_ids.append(ids[:, 1:])
            topk_logprobs.append(scores[:, 1:])
    if not topk:
        return TokenScores(torch.cat(logprobs))
    return TokenScores(torch.cat(logprobs), torch.cat(topk_ids), torch.cat(topk_logprobs))
