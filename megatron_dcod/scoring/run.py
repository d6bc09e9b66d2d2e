"""The scorer's run: every check before any work, then per dataset this rank's pending shards,
then (global rank 0) the merge of all shards into the dataset.

    prepare (every rank, no process group) ─► process group, TP/PP state ─► load the stage
        ─► per dataset: pack & forward this DP rank's pending shards, write them (last stage,
           TP rank 0) ─► rank 0: wait for every shard, add the arrays, meta.json last
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_dcod.data.trace_format import TokenizerFingerprint, TraceDataset, TraceFormatError
from megatron_dcod.data.trace_update import ArrayAdder
from megatron_dcod.platform.launch import launched_world_size
from megatron_dcod.scoring.config import ScoreConfig
from megatron_dcod.scoring.forward import score_rows
from megatron_dcod.scoring.packing import pack_shard, unpack
from megatron_dcod.scoring.shards import ScoringJob

logger = logging.getLogger(__name__)

ARRAY_NAMES = {
    "teacher": {
        "logprobs": "teacher_logprobs",
        "topk_ids": "teacher_topk_ids",
        "topk_logprobs": "teacher_topk_logprobs",
    },
    "ref": {"logprobs": "ref_logprobs"},
}
"""Which dataset array each score becomes, per role."""


@dataclass
class Prepared:
    """What the checks found; the run needs nothing else from the files."""

    hf_config: Any
    checkpoint_dir: Path
    fingerprint: TokenizerFingerprint
    """The scoring model's tokenizer."""
    jobs: list[ScoringJob]
    """One per dataset still to score (a dataset this very job already scored is left out)."""


def prepare(config: ScoreConfig) -> Prepared:
    """Every check that needs no process group, on every rank (they all reach the same verdict):
    the model dir, the layout, the checkpoint, the tokenizer against each dataset, the arrays."""
    from megatron_dcod.checkpoint.megatron_side import check_parallel_layout
    from megatron_dcod.checkpoint.megatron_side import resolve_checkpoint_dir
    from megatron_dcod.data.chat import ChatTokenizer
    from megatron_dcod.models.student import load_hf_config

    hf_config = load_hf_config(config.hf_config)
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    check_parallel_layout(hf_config, tp, pp)
    world_size = launched_world_size()
    if world_size % (tp * pp):
        raise ValueError(f"{world_size} processes are not a multiple of TP × PP = {tp * pp}")
    if config.topk > hf_config.vocab_size:
        raise ValueError(f"--topk {config.topk} exceeds the vocabulary of {hf_config.vocab_size}")
    checkpoint_dir = resolve_checkpoint_dir(Path(config.load))
    tokenizer_dir = config.tokenizer or config.hf_config
    try:
        fingerprint = ChatTokenizer(tokenizer_dir).fingerprint
    except (OSError, ValueError) as error:
        raise ValueError(f"no tokenizer in {tokenizer_dir} (pass --tokenizer DIR): {error}")
    jobs = []
    for prefix in config.data_path:
        dataset = check_dataset(prefix, config, fingerprint, hf_config.vocab_size)
        job = ScoringJob(dataset, config, checkpoint_dir)
        if job.is_done():
            logger.info("%s: already scored by this checkpoint and settings", prefix)
            continue
        present = [name for name in config.replaced_arrays if dataset.has(name)]
        if present and not config.overwrite:
            origin = dataset.meta.get("teacher_logprobs_from", "records")
            raise FileExistsError(
                f"{prefix}: already has {', '.join(present)} (from {origin}); pass --overwrite "
                "to replace them"
            )
        jobs.append(job)
    return Prepared(hf_config, checkpoint_dir, fingerprint, jobs)


def check_dataset(
    prefix: str, config: ScoreConfig, fingerprint: TokenizerFingerprint, vocab_size: int
) -> TraceDataset:
    """Open a dataset and refuse what this run cannot score correctly."""
    dataset = TraceDataset(prefix)
    stored = TokenizerFingerprint(**dataset.meta["tokenizer"])
    differing = [
        f for f in ("vocab_size", "vocab_sha256") if getattr(stored, f) != getattr(fingerprint, f)
    ]
    if differing:
        raise TraceFormatError(
            f"{prefix}: tokenized with {stored.name_or_path} ({stored.vocab_size} tokens, vocab "
            f"sha256 {stored.vocab_sha256[:12]}), but the scoring model's tokenizer "
            f"{fingerprint.name_or_path} has {fingerprint.vocab_size} tokens, vocab sha256 "
            f"{fingerprint.vocab_sha256[:12]}: the teacher must share the student's tokenizer"
        )
    if dataset.max_id("tokens") >= vocab_size:
        raise TraceFormatError(
            f"{prefix}: token id {dataset.max_id('tokens')} is beyond the scoring model's "
            f"vocab_size {vocab_size}"
        )
    longest = int(dataset.lengths.argmax()) if len(dataset) else None
    if longest is not None and dataset.lengths[longest] > config.seq_length:
        raise ValueError(
            f"{prefix}: trace {longest} has {dataset.lengths[longest]} tokens, more than "
            f"--seq-length {config.seq_length} (a trace is scored in one row)"
        )
    return dataset


def score(config: ScoreConfig, prepared: Prepared, cpu: bool, command: str = "") -> list[dict]:
    """Score every dataset, then (global rank 0) merge each; returns the new meta.json of each
    on global rank 0 (else []). Two phases: no rank waits on a collective while rank 0 waits
    for the other replicas' shards and merges (which can take long at scale)."""
    from megatron_dcod.scoring.model import load_stage

    model = load_stage(config, prepared.hf_config, prepared.checkpoint_dir, cpu)
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    rank = dist.get_rank()
    to_score = sum(job.tokens(i) for job in prepared.jobs for i in job.pending(0, 1))
    if rank == 0:
        for job in prepared.jobs:
            job.clear_failures()
    dist.barrier()  # every rank loaded: the timing starts together (no collective after it)
    started = time.monotonic()
    for job in prepared.jobs:
        try:
            _score_own_shards(job, model, config, prepared.hf_config.vocab_size, device)
        except BaseException as error:  # the merging rank must not wait for this rank's shards
            job.fail(rank, f"{type(error).__name__}: {error}")
            raise
    if rank != 0:
        return []
    metas = [_merge(job, config, prepared, command) for job in prepared.jobs]
    seconds = time.monotonic() - started
    logger.info(
        "scored %d tokens of %d dataset(s) in %.1f s (%.0f tokens/s, all ranks)",
        to_score, len(prepared.jobs), seconds, to_score / max(seconds, 1e-9),
    )  # fmt: skip
    return metas


def _agreed_pending(job: ScoringJob) -> list[int]:
    """This DP rank's unfinished shards, as the first rank of its model-parallel group sees
    them: every rank of a pipeline must run the same forward passes."""
    from megatron.core import parallel_state

    shards = job.pending(
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        message = [shards]
        dist.broadcast_object_list(message, src=dist.get_global_rank(group, 0), group=group)
        shards = message[0]
    return shards


def _score_own_shards(job: ScoringJob, model, config: ScoreConfig, vocab_size: int, device) -> None:
    from megatron.core import parallel_state

    pending = _agreed_pending(job)
    done = len(job.shards) - len(job.pending(0, 1))
    if done and dist.get_rank() == 0:
        logger.info("%s: resuming, %d of %d shards done", job.dataset.prefix, done, len(job.shards))
    writes = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    shows = writes and parallel_state.get_data_parallel_rank() == 0
    total = sum(job.tokens(index) for index in pending)
    with tqdm(total=total, desc="score", unit="tok", unit_scale=True, disable=not shows) as bar:
        for index in pending:
            traces = [job.dataset[i] for i in job.shards[index]]
            packed = pack_shard(
                [t.tokens for t in traces], config.seq_length, config.micro_batch_size
            )
            per_position = score_rows(
                model, packed, vocab_size=vocab_size, topk=config.topk,
                rows=config.micro_batch_size, microbatches=config.microbatches(),
                chunk_tokens=config.logits_chunk_tokens, device=device,
            )  # fmt: skip
            if writes:
                job.save(
                    index, _shard_values(per_position, packed, traces, job, index, config.role)
                )
            bar.update(job.tokens(index))


def _shard_values(per_position, packed, traces, job: ScoringJob, index: int, role: str) -> dict:
    """The shard's traces' values, in trace order, under their dataset array names."""
    by_trace = sorted(packed.placements, key=lambda placement: placement.trace)
    values = {}
    for score, array in ARRAY_NAMES[role].items():
        if score not in per_position:
            continue
        pieces = [unpack(per_position[score], p, traces[p.trace].loss_mask) for p in by_trace]
        values[array] = np.concatenate(pieces)  # [shard tokens] or [shard tokens, k]
    for name in ("teacher_logprobs", "ref_logprobs", "teacher_topk_logprobs"):
        if name in values:
            _check_finite(values[name], job, index, name)
            values[name] = np.minimum(values[name], 0.0)  # an fp32 rounding above 0 is p = 1
    return values


def _check_finite(values: np.ndarray, job: ScoringJob, index: int, name: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        token = int(np.argwhere(bad)[0][0])
        shard = job.shards[index]
        ends = np.cumsum(job.dataset.lengths[shard.start : shard.stop])
        trace = shard.start + int(np.searchsorted(ends, token, side="right"))
        raise FloatingPointError(
            f"{job.dataset.prefix}: the model's {name} of trace {trace} is not finite"
        )


def _merge(job: ScoringJob, config: ScoreConfig, prepared: Prepared, command: str) -> dict:
    """Wait for every shard, add their arrays to the dataset (meta.json last), delete the work
    dir and those of other jobs; temporary files of an earlier, killed merge go first."""
    job.wait_for_all()
    prefix = Path(job.dataset.prefix)
    for leftover in prefix.parent.glob(f".{prefix.name}.partial-*"):
        leftover.unlink(missing_ok=True)
    scoring = dict(job.dataset.meta.get("scoring", {}))
    scoring[config.role] = {
        "scorer": "megatron",
        "hf_config": config.hf_config,
        "checkpoint": str(prepared.checkpoint_dir),
        "job_key": job.key,
        "tokenizer": asdict(prepared.fingerprint),
        "topk": config.topk,
        "dtype": config.dtype,
        "tensor_model_parallel_size": config.tensor_model_parallel_size,
        "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
        "world_size": dist.get_world_size(),
        "command": command,
    }
    update: dict[str, Any] = {"scoring": scoring}
    if config.role == "teacher":
        update["teacher_logprobs_from"] = "model"
    remove = tuple(name for name in config.replaced_arrays if name not in config.arrays)
    with ArrayAdder(job.dataset.prefix, config.arrays, config.topk) as adder:
        for index, shard in enumerate(job.shards):
            adder.add(job.load(index), traces=len(shard))
        meta = adder.commit(update, remove)
    job.remove()
    job.remove_stale()
    logger.info("%s: %s added", job.dataset.prefix, ", ".join(config.arrays))
    return meta
