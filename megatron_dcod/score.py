"""Add teacher log-probs to trace datasets with a Megatron checkpoint: `python -m
megatron_dcod.score` alone, or under `torchrun` / `srun` with TP × PP × DP processes.

    torchrun --nproc_per_node 8 -m megatron_dcod.score --hf-config models/teacher \\
        --load ckpt/teacher-mcore --tensor-model-parallel-size 4 --bf16 \\
        --data-path data/traces --seq-length 16384 --topk 8

The teacher is the student's architecture family (the trainer's model builder) read from a
`tools/convert_checkpoint.py import-hf` checkpoint at any layout. Traces are sharded over the
data-parallel ranks and packed into `--seq-length` rows; the arrays are added to the dataset
(meta.json last), resumably by shard. The code is under `megatron_dcod/scoring/`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from typing import Iterator


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from megatron_dcod.megatron import patches
    from megatron_dcod.platform.launch import adopt_slurm_ranks, launched_rank
    from megatron_dcod.scoring.arguments import parse_config
    from megatron_dcod.scoring.run import prepare, score
    from megatron_dcod.scoring.shards import ShardFailed

    config = parse_config(argv)
    adopt_slurm_ranks()  # plain srun: one task per GPU, MASTER_ADDR / MASTER_PORT exported
    # Megatron asks for it with TP > 1 before Blackwell (in-order kernels for its overlaps)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # clean-up runs: no temporary files left
    applied = patches.apply(patches.LIBRARY)  # Python 3.11 imports; the CPU mode without CUDA
    _quiet_libraries()
    try:
        prepared = prepare(config)  # before any process group, model or file is touched
    except (ValueError, FileExistsError) as error:
        if launched_rank() == 0:  # every rank reaches the same verdict: say it once
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if not prepared.jobs:
        return
    try:
        with process_group(config, applied.cpu):
            command = shlex.join(["python", "-m", "megatron_dcod.score", *argv])
            score(config, prepared, applied.cpu, command)
    except (ValueError, FloatingPointError, ShardFailed) as error:
        print(f"error (rank {launched_rank()}): {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _quiet_libraries() -> None:
    """The scorer's lines and progress bar, not megatron-core's per-module chatter."""
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_dcod").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@contextlib.contextmanager
def process_group(config, cpu: bool) -> Iterator[None]:
    """torch.distributed from the launcher's environment (a one-process group without one) and
    Megatron's model-parallel state at the config's TP/PP; both torn down afterwards."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = not dist.is_initialized()
    if created:
        backend = "gloo" if cpu else "nccl"
        if not cpu:
            local_rank = os.environ.get("LOCAL_RANK")
            if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("LOCAL_RANK is not set: launch with torchrun or srun")
            torch.cuda.set_device(int(local_rank or 0))
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    )
    model_parallel_cuda_manual_seed(config.seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
