"""One micro-batch from the data iterator, on the device, ready for the model and the loss.

Everything that needs host-side values (segment numbering, the THD `cu_seqlens` and the longest
trace) is computed from the loader's CPU tensors before they are copied to the device, so the
forward step never waits for the device.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

PACKED_FORMAT = "thd"


def next_batch(
    data_iterator: Iterator[dict], device: torch.device, pack: bool
) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors [b, s] (top-k [b, s, k]) of the next micro-batch, PackedSeqParams or None).

    `segment_ids` are renumbered 0, 1, ... over the micro-batch's runs of equal ids (a trace, or
    the padding at the end of a row) in row-major order: unique across rows and below b·s.
    Every rank reads its own batch (the dataset provider is distributed), so model-parallel
    ranks need no broadcast of the per-token arrays.
    """
    cpu_batch = dict(next(data_iterator))
    segment_starts = run_starts(cpu_batch["segment_ids"])  # [b, s] bool, on the host
    cpu_batch["segment_ids"] = segment_starts.reshape(-1).cumsum(0).view_as(segment_starts) - 1
    packed = packed_seq_params(segment_starts, device) if pack else None
    batch = {name: tensor.to(device, non_blocking=True) for name, tensor in cpu_batch.items()}
    return batch, packed


def run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: True where a run of equal segment ids begins (every row starts one)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def packed_seq_params(segment_starts: torch.Tensor, device: torch.device):
    """THD PackedSeqParams of the micro-batch flattened to one row of b·s tokens.

    Each run (a trace, or a row's padding) attends only to itself; `cu_seqlens` marks where the
    runs start. `segment_starts` [b, s] is a host tensor (see `run_starts`).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = segment_starts.reshape(-1)  # [b*s]
    starts = torch.nonzero(flat).squeeze(-1)  # [n_segments]
    edges = torch.cat([starts, starts.new_tensor([flat.numel()])])  # [n_segments + 1]
    max_seqlen = int((edges[1:] - edges[:-1]).max())
    cu_seqlens = edges.to(torch.int32).to(device, non_blocking=True)
    return PackedSeqParams(
        qkv_format=PACKED_FORMAT,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
