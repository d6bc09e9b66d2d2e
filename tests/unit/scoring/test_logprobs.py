"""Vocab-parallel next-token log-probs and top-k (scoring/logprobs.py) against a float64
log-softmax over the model's vocabulary (the padded rows excluded), at TP=1 and on 2 gloo ranks."""

import numpy as np
import torch

from megatron_dcod.scoring.logprobs import score_next_tokens
from tests.helpers.distributed import run_distributed_test

VOCAB, PADDED, TOPK = 20, 64, 5  # at TP=2 the second shard (ids 32..63) is all padding


def make_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(37, PADDED, generator=generator) * 3  # [t, padded vocab]
    logits[:, VOCAB:] = 50.0  # padding rows with the largest logits: must get no mass
    targets = torch.randint(0, VOCAB, (37,), generator=generator)  # [t]
    return logits, targets


def reference(logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits[:, :VOCAB].double(), dim=-1)  # [t, V]
    values, ids = logp.topk(TOPK, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], ids, values


def check(scores, logits, targets) -> None:
    logprobs, ids, values = reference(logits, targets)
    np.testing.assert_allclose(scores.logprobs.double(), logprobs, atol=1e-5)
    np.testing.assert_array_equal(scores.topk_ids, ids)
    np.testing.assert_allclose(scores.topk_logprobs.double(), values, atol=1e-5)


def test_single_rank_in_chunks():
    logits, targets = make_logits()
    check(score_next_tokens(logits, targets, VOCAB, TOPK, chunk=8), logits, targets)
    without_topk = score_next_tokens(logits, targets, VOCAB, 0, chunk=64)
    assert without_topk.topk_ids is None
    np.testing.assert_allclose(
        without_topk.logprobs.double(), reference(logits, targets)[0], atol=1e-5
    )


def sharded_scores() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(2)
    try:
        logits, targets = make_logits()
        width = PADDED // 2
        rank = dist.get_rank()
        shard = logits[:, rank * width : (rank + 1) * width].contiguous()  # [t, v/tp]
        check(score_next_tokens(shard, targets, VOCAB, TOPK, chunk=16), logits, targets)
    finally:
        parallel_state.destroy_model_parallel()


def test_two_tensor_parallel_ranks_one_shard_all_padding():
    run_distributed_test(sharded_scores, world_size=2)
