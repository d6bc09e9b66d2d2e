"""Packed-sequence (THD) attention for the local, non-Transformer-Engine layer spec.

Megatron-Core's own `DotProductAttention` refuses packed sequences; with Transformer Engine the
fused kernels take `cu_seqlens`. Without TE (CPU mode, tests, a GPU without TE) this subclass
gives the same result: the packed tokens attend causally and only within their own trace.
RoPE already restarts per trace: Megatron applies it per `cu_seqlens` segment before core
attention.

Two paths: each trace attending only to itself through torch's `scaled_dot_product_attention`
(traces of similar length batched; cost about Σ Lᵢ² rather than t² for a row of t tokens, no
t × t mask), or, for what that path does not reproduce
(attention dropout in training, a softmax offset, query-key layer scaling, windowed
attention), Megatron's own attention over the whole row with a block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        if self._per_trace_kernel_applies(attention_bias):
            return self._per_trace(query, key, value, packed_seq_params.cu_seqlens_q)
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

    def _per_trace_kernel_applies(self, attention_bias: torch.Tensor | None) -> bool:
        """Whether plain causal softmax(q·kᵀ·scale)·v per trace is exactly this attention."""
        config = self.config
        return (
            attention_bias is None
            and self.softmax_offset is None
            and not config.apply_query_key_layer_scaling
            and getattr(config, "window_size", None) is None
            and (not self.training or self.attention_dropout.p == 0.0)
        )

    def _per_trace(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """query [t, np, hn], key/value [t, ng, hn] → [t, 1, np·hn], each trace on its own.

        Traces of similar length are padded into one batch per kernel call (`length_groups`);
        each query sees the keys of its own trace up to itself."""
        bounds = cu_seqlens.tolist()  # host copy: one per layer call
        starts, lengths = bounds[:-1], [end - start for start, end in zip(bounds, bounds[1:])]
        pieces, positions = [], []
        for group in length_groups(lengths):
            longest = lengths[group[0]]
            offsets = torch.arange(longest, device=query.device)  # [L]
            first = torch.tensor([starts[i] for i in group], device=query.device)  # [n]
            size = torch.tensor([lengths[i] for i in group], device=query.device)  # [n]
            index = first[:, None] + offsets.clamp(max=longest - 1)  # [n, L] token of each slot
            valid = offsets[None, :] < size[:, None]  # [n, L] slots holding a token
            index = torch.where(valid, index, first[:, None])  # padding slots read a real token
            mask = None  # one trace: plain causal attention
            if len(group) > 1:  # [n, 1, L, L]: causal, and only keys of the trace
                causal = offsets[None, :] <= offsets[:, None]  # [L, L]
                mask = (causal[None] & valid[:, None, :])[:, None]
            context = F.scaled_dot_product_attention(
                query[index].transpose(1, 2),  # [n, np, L, hn]
                key[index].transpose(1, 2),  # [n, ng, L, hn]
                value[index].transpose(1, 2),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.softmax_scale,
                enable_gqa=key.shape[1] != query.shape[1],  # kv head i // (np/ng), as Megatron
            )  # [n, np, L, hn]
            pieces.append(context.transpose(1, 2)[valid])  # [tokens of the group, np, hn]
            positions.append(index[valid])
        context = torch.cat(pieces)[torch.cat(positions).argsort()]  # [t, np, hn], row order
        return context.reshape(context.shape[0], 1, -1)  # [t, 1, np·hn]


MAX_PADDING = 0.25
"""A batch of traces padded to its longest may hold at most this share of padding slots."""


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of traces batched together: by decreasing length, a trace joins the current
    batch while the batch's padding stays within MAX_PADDING of its slots."""
    groups: list[list[int]] = []
    used = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        if groups:
            slots = lengths[groups[-1][0]] * (len(groups[-1]) + 1)
            if used + lengths[index] >= (1 - MAX_PADDING) * slots:
                groups[-1].append(index)
                used += lengths[index]
                continue
        groups.append([index])
        used = lengths[index]
    return groups
