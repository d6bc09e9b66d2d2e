"""The vocab-parallel log-probs and top-k losses on 2 tensor-parallel ranks against the full
vocabulary on one: values and gradients of every logit shard."""

import torch

from tests.helpers.distributed import run_distributed_test

VOCAB, TOPK = 12, 3


def inputs():
    """The same full-vocabulary logits, ids and teacher top-k on every rank (float64)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64) * 3
    ids = torch.randint(0, VOCAB, (2, 5, 1 + TOPK), generator=generator)  # label + top-k
    teacher = torch.log_softmax(torch.randn(2, 5, VOCAB, generator=generator), -1)
    teacher_topk = teacher.gather(-1, ids[..., 1:]).to(torch.float16)
    upstream = torch.randn(2, 5, 1 + TOPK, generator=generator, dtype=torch.float64)
    return logits, ids, teacher_topk, upstream


def shard(logits: torch.Tensor, rank: int) -> torch.Tensor:
    width = VOCAB // 2
    return logits[..., rank * width : (rank + 1) * width].detach().clone().requires_grad_(True)


def compare_on_two_ranks():
    from megatron.core import parallel_state

    from megatron_dcod.config import CorrectionConfig
    from megatron_dcod.correction.objective import student_logprobs_and_token_loss
    from megatron_dcod.correction.token_losses import vocab_parallel_logprobs_at

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, ids, teacher_topk, upstream = inputs()

    full = logits.clone().requires_grad_(True)  # reference: log-softmax over all ids at once
    reference = torch.log_softmax(full, -1).gather(-1, ids)
    (reference * upstream).sum().backward()
    local = shard(logits, rank)
    picked = vocab_parallel_logprobs_at(local, ids)
    torch.testing.assert_close(picked, reference.detach(), rtol=1e-12, atol=1e-12)
    (picked * upstream).sum().backward()
    torch.testing.assert_close(local.grad, shard(full.grad, rank), rtol=1e-10, atol=1e-12)

    batch = {"labels": ids[..., 0], "teacher_topk_ids": ids[..., 1:]}
    batch["teacher_topk_logprobs"] = teacher_topk
    for base_loss in ("kl", "todi"):
        for mode in ("renormalize", "tail"):
            config = CorrectionConfig(base_loss=base_loss, topk_mode=mode, todi_beta=0.5)
            local = shard(logits, rank)
            logp, token_loss = student_logprobs_and_token_loss(config, local, batch)
            token_loss.sum().backward()
            parallel_state.destroy_model_parallel()  # the reference: one rank's whole vocabulary
            whole = logits.clone().requires_grad_(True)
            logp_ref, loss_ref = student_logprobs_and_token_loss(config, whole, batch)
            loss_ref.sum().backward()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
            torch.testing.assert_close(logp, logp_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(token_loss, loss_ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(local.grad, shard(whole.grad, rank), rtol=1e-9, atol=1e-12)


def test_vocab_parallel_logprobs_and_topk_losses_at_tp2():
    run_distributed_test(compare_on_two_ranks, world_size=2)
