"""Forward passes of a packed shard through the pipeline: Megatron's forward-only schedule.

Each micro-batch of packed rows is flattened to one row of THD-packed traces (attention inside
each trace, as training runs it, `training/batch.py`); the last pipeline stage scores every
position's next token (`scoring/logprobs.py`) and hands the scores to the schedule as non-loss
data. Every rank of a pipeline reads the same shard, so all stages agree on the micro-batches.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from megatron_dcod.scoring.logprobs import TokenScores, score_next_tokens
from megatron_dcod.scoring.packing import PackedShard
from megatron_dcod.training.batch import packed_seq_params, run_starts


@torch.no_grad()
def score_rows(
    model, packed: PackedShard, *, vocab_size: int, topk: int, rows: int, microbatches: int,
    chunk_tokens: int, device: torch.device,
) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Per-position scores of the packed rows ([rows, s] log-probs, [rows, s, k] top-k), on the
    last pipeline stage; None on the others."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = packed.micro_batches(rows)
    seq_length = packed.tokens.shape[1]
    scores: list[TokenScores] = []
    for start in range(0, len(batches), microbatches):
        group = batches[start : start + microbatches]
        scores += get_forward_backward_func()(
            forward_step_func=partial(
                _forward_step, packed, device, vocab_size, topk, chunk_tokens
            ),
            data_iterator=iter(group),
            model=[model],
            num_microbatches=len(group),
            seq_length=rows * seq_length,  # one flattened row per micro-batch
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return _per_position(scores, packed.tokens.shape, topk)


def _forward_step(packed, device, vocab_size, topk, chunk_tokens, data_iterator, model):
    rows = next(data_iterator)
    tokens = torch.from_numpy(packed.tokens[rows])  # [b, s]
    positions = torch.from_numpy(packed.position_ids[rows])  # [b, s]
    params = packed_seq_params(run_starts(torch.from_numpy(packed.segment_ids[rows])), device)
    flat = tokens.reshape(1, -1).to(device)  # [1, b·s]
    output = model(flat, positions.reshape(1, -1).to(device), None, packed_seq_params=params)
    next_tokens = torch.roll(flat[0], -1)  # [b·s]: position j's target is token j + 1

    def scores(output: torch.Tensor, non_loss_data: bool = True) -> TokenScores:
        result = score_next_tokens(output[0], next_tokens, vocab_size, topk, chunk_tokens)
        return result.to_host()  # a shard's scores do not pile up on the device

    return output, scores  # output [1, b·s, v/tp] logits on the last stage


def _per_position(scores: list[TokenScores], shape: tuple[int, int], topk: int) -> dict:
    """The micro-batches' scores as arrays over the packed rows."""
    rows, seq_length = shape
    result = {
        "logprobs": torch.cat([s.logprobs for s in scores]).cpu().numpy().reshape(rows, seq_length)
    }
    if topk:
        ids = torch.cat([s.topk_ids for s in scores]).cpu().numpy()
        logprobs = torch.cat([s.topk_logprobs for s in scores]).cpu().numpy()
        result["topk_ids"] = ids.reshape(rows, seq_length, topk).astype(np.int32)
        result["topk_logprobs"] = logprobs.reshape(rows, seq_length, topk)
    return result
