"""One micro-batch from the data iterator, on the device, ready for the model and the loss."""

from __future__ import annotations

from typing import Iterator

import torch

PACKED_FORMAT = "thd"


def next_batch(data_iterator: Iterator[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors [b, s] (top-k [b, s, k]) of the next micro-batch; trace ids unique in the batch.

    Every rank reads its own batch (the dataset provider is distributed), so model-parallel
    ranks need no broadcast of the per-token arrays.
    """
    batch = {
        name: tensor.to(device, non_blocking=True) for name, tensor in next(data_iterator).items()
    }
    rows, seq = batch["tokens"].shape
    row_offset = torch.arange(rows, device=device)[:, None] * (seq + 1)  # [b, 1]
    batch["segment_ids"] = batch["segment_ids"] + row_offset  # [b, s], unique across rows
    return batch


def packed_seq_params(segment_ids: torch.Tensor):
    """THD PackedSeqParams of the micro-batch flattened to one row of b·s tokens.

    Each run of equal segment ids (a trace, or the padding at the end of a row) attends only to
    itself; `cu_seqlens` marks where the runs start.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = segment_ids.reshape(-1)  # [b*s]
    starts = torch.nonzero(flat[1:] != flat[:-1]).squeeze(-1) + 1  # [n_segments - 1]
    edges = torch.cat([starts.new_zeros(1), starts, starts.new_tensor([flat.numel()])])
    cu_seqlens = edges.to(torch.int32)  # [n_segments + 1]
    max_seqlen = int((edges[1:] - edges[:-1]).max())
    return PackedSeqParams(
        qkv_format=PACKED_FORMAT,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
