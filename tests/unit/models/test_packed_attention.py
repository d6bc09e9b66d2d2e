"""Packed (THD) attention without Transformer Engine: the per-trace kernel path equals the
block-masked whole-row path (Megatron's own attention) in outputs and gradients, and each trace
attended alone with a plain causal float64 softmax."""

import math

import torch

from megatron_dcod.models.packed_attention import PackedDotProductAttention
from tests.helpers.distributed import run_distributed_test

HEADS, GROUPS, DIM = 4, 2, 8
LENGTHS = [5, 1, 9, 3]  # a row of four traces (one of a single token)


def build():
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)  # the masked path forks Megatron's RNG for dropout
    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
        num_query_groups=GROUPS, kv_channels=DIM, use_cpu_initialization=True,
        masked_softmax_fusion=False,
    )  # fmt: skip
    return PackedDotProductAttention(config, 1, AttnMaskType.causal, "self")


def inputs(seed: int = 0):
    from megatron.core.packed_seq_params import PackedSeqParams

    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q = torch.randn(total, HEADS, DIM, generator=generator, requires_grad=True)
    k = torch.randn(total, GROUPS, DIM, generator=generator, requires_grad=True)
    v = torch.randn(total, GROUPS, DIM, generator=generator, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS),
    )  # fmt: skip
    return q, k, v, params


def float64_reference(q, k, v):
    """Each trace alone: causal softmax(q kᵀ / √d) v with KV heads repeated, in float64."""
    outputs, start = [], 0
    for length in LENGTHS:
        part = slice(start, start + length)
        qs = q[part].double().transpose(0, 1)  # [h, L, d]
        ks = k[part].double().repeat_interleave(HEADS // GROUPS, 1).transpose(0, 1)
        vs = v[part].double().repeat_interleave(HEADS // GROUPS, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(DIM)  # [h, L, L]
        scores = scores.masked_fill(~torch.ones(length, length).tril().bool(), float("-inf"))
        outputs.append((scores.softmax(-1) @ vs).transpose(0, 1))  # [L, h, d]
        start += length
    return torch.cat(outputs).reshape(sum(LENGTHS), 1, HEADS * DIM)


def both_paths_agree() -> None:
    from megatron.core import parallel_state

    try:
        attention = build().eval()
        q, k, v, params = inputs()
        assert attention._per_trace_kernel_applies(None)
        fast = attention(q, k, v, None, packed_seq_params=params)
        torch.testing.assert_close(fast.double(), float64_reference(q, k, v), atol=1e-6, rtol=0)
        fast_grads = torch.autograd.grad(fast.square().sum(), (q, k, v))
        attention._per_trace_kernel_applies = lambda bias: False  # Megatron's masked path
        masked = attention(q, k, v, None, packed_seq_params=params)
        torch.testing.assert_close(fast, masked, atol=1e-6, rtol=0)
        for fast_grad, masked_grad in zip(
            fast_grads, torch.autograd.grad(masked.square().sum(), (q, k, v))
        ):
            torch.testing.assert_close(fast_grad, masked_grad, atol=1e-5, rtol=0)
        attention.train()
        attention.attention_dropout.p = 0.1
        del attention._per_trace_kernel_applies
        assert not attention._per_trace_kernel_applies(None)  # dropout: the masked path
    finally:
        parallel_state.destroy_model_parallel()


def test_per_trace_kernel_equals_the_masked_row():
    run_distributed_test(both_paths_agree, world_size=1)


def test_length_groups_batch_similar_lengths_within_the_padding_bound():
    from megatron_dcod.models.packed_attention import MAX_PADDING, length_groups

    assert length_groups(LENGTHS) == [[2, 0], [3], [1]]  # the test row: a batch and two alone
    lengths = torch.randint(1, 300, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    groups = length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(200))
    for group in groups:
        slots = max(lengths[i] for i in group) * len(group)
        assert sum(lengths[i] for i in group) >= (1 - MAX_PADDING) * slots
    assert len(groups) < 40
