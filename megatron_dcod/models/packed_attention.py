"""Packed-sequence (THD) attention for the local, non-Transformer-Engine layer spec.

Megatron-Core's own `DotProductAttention` refuses packed sequences; with Transformer Engine the
fused kernels take `cu_seqlens`. Without TE (CPU mode, tests) this subclass gives the same
result: the packed tokens attend causally and only within their own trace, through an explicit
block-diagonal causal mask. RoPE already restarts per trace: Megatron applies it per
`cu_seqlens` segment before core attention.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True where attention is NOT allowed (Megatron's mask convention)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    segment = torch.bucketize(positions, cu_seqlens[1:], right=True)  # [t] trace of each token
    same_trace = segment[:, None] == segment[None, :]  # [t, t]
    causal = positions[None, :] <= positions[:, None]  # key position ≤ query position
    return ~(same_trace & causal)[None, None]


class PackedDotProductAttention(DotProductAttention):
    """`DotProductAttention` that also accepts packed (THD) batches."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention needs qkv_format 'thd', got {packed_seq_params}")
        # THD: query [t, heads, dim]; the base class wants [t, b=1, heads, dim]
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        return super().forward(
            query.unsqueeze(1),
            key.unsqueeze(1),
            value.unsqueeze(1),
            mask,
            AttnMaskType.causal,
            attention_bias,
        )  # [t, 1, heads * dim]
