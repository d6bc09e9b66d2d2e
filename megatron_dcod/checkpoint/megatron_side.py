"""What both conversion directions need from Megatron: its arguments for an HF architecture, a
one-process group, and the student's checkpoint layout without allocating its weights."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron's file naming the newest iteration (or `release`) under a --save dir."""
RELEASE_DIR = "release"
"""Megatron's directory for a converted checkpoint: loads at iteration 0, no optimizer."""


def check_parallel_layout(config: Any, tensor_parallel: int, pipeline_parallel: int) -> None:
    """TP must divide the attention heads and query groups, PP the layers."""
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    if tensor_parallel < 1 or heads % tensor_parallel or groups % tensor_parallel:
        raise ValueError(
            f"--tensor-model-parallel-size {tensor_parallel} does not divide the "
            f"{heads} attention heads and {groups} query groups"
        )
    layers = config.num_hidden_layers
    if pipeline_parallel < 1 or layers % pipeline_parallel:
        raise ValueError(
            f"--pipeline-model-parallel-size {pipeline_parallel} does not divide the "
            f"{layers} layers"
        )


def megatron_args(
    hf_dir: Path, flags: list[str], tensor_parallel: int, pipeline_parallel: int, cpu: bool = True
):
    """Megatron's validated arguments for the HF architecture at the given layout, built the way
    the trainer builds them (same architecture flags, same vocabulary padding); no globals.
    `cpu`: with the CPU mode's flags (the converters; the scorer where CUDA is absent).
    Needs the library patches (`conversion_session`)."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_dcod.megatron import argv

    flags = [
        f"--hf-config={hf_dir}",
        f"--tensor-model-parallel-size={tensor_parallel}",
        f"--pipeline-model-parallel-size={pipeline_parallel}",
        "--micro-batch-size=1",
        "--ckpt-format=torch_dist",
        *flags,
    ]
    args = argv.parse(flags, cpu=cpu, world_size=tensor_parallel * pipeline_parallel, quiet=True)
    build_tokenizer(args)  # sets args.padded_vocab_size as the trainer's tokenizer does
    return args


@contextlib.contextmanager
def conversion_session() -> Iterator[None]:
    """The library patches (Python 3.11; the CPU mode where CUDA is absent) for the length of a
    conversion, undone after it: a conversion leaves nothing process-wide behind."""
    from megatron_dcod.megatron import patches

    with patches.applied(patches.LIBRARY):
        yield


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-rank gloo group with Megatron's model-parallel state at TP = PP = 1 (inside a
    `conversion_session` where CUDA is absent)."""
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process")
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def meta_student(args, hf_config):
    """The whole student on the meta device (no memory for weights), in one process: torch_dist
    checkpoints store global tensors, so its layout holds for any TP/PP."""
    from megatron_dcod.models.student import student_from_args

    with torch.device("meta"):
        return student_from_args(
            args,
            hf_config,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            perform_initialization=False,
            use_cpu_initialization=True,
        )


@contextlib.contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """A fresh `{out}.partial` dir to write into, renamed to `out` only if the block succeeds;
    removed if it fails, so no partial output is left under either name."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)


def resolve_checkpoint_dir(path: Path) -> Path:
    """An iteration (or release) dir, given it or a --save dir with Megatron's tracker file."""
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        name = tracker.read_text().strip()
        path = path / (RELEASE_DIR if name == RELEASE_DIR else f"iter_{int(name):07d}")
    metadata = path / "metadata.json"
    backend = (
        json.loads(metadata.read_text()).get("sharded_backend") if metadata.is_file() else None
    )
    if backend != "torch_dist":
        raise ValueError(
            f"{path}: not a Megatron torch_dist checkpoint (no {TRACKER_FILE}, or metadata.json "
            f"missing or not torch_dist); train with --ckpt-format torch_dist"
        )
    return path
