"""Run `python -m megatron_dcod.train` under torchrun on CPU and read back what it wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
WEIGHT_LINE = re.compile(r"iteration\s+(\d+) \| dcod weights \| (.*) \|")


def tiny_run_flags(hf_config: Path, data_prefix: Path, iters: int) -> list[str]:
    """Flags of a tiny deterministic run (fp32, no dropout, constant LR)."""
    return [
        f"--hf-config={hf_config}",
        f"--data-path={data_prefix}",
        "--split=100,0,0",
        "--seq-length=32",
        f"--train-iters={iters}",
        "--lr=2e-3",
        "--lr-decay-style=constant",
        "--weight-decay=0.0",
        "--clip-grad=0.0",
        "--log-interval=1",
        "--eval-interval=100000",
        "--eval-iters=0",
        "--seed=1234",
        "--make-vocab-size-divisible-by=32",
        "--ckpt-format=torch_dist",
    ]


def train(*flags: str, nproc: int = 1, env: dict | None = None, check: bool = True) -> str:
    """stdout+stderr of a torchrun training run; AssertionError with its tail if it fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "megatron_dcod.train", *flags,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{output[-6000:]}")
    return output


def logged_losses(output: str, key: str = "lm loss") -> dict[int, float]:
    """{iteration: value of `key`} from Megatron's training log lines."""
    pattern = re.compile(rf"iteration\s+(\d+)/\s*\d+ \|.*? {key}: ([0-9.E+-]+|nan) \|")
    return {int(it): float(value) for it, value in pattern.findall(output)}


def logged_weight_metrics(output: str) -> dict[int, dict[str, float]]:
    """{iteration: {metric: value}} from the dcod weights log lines."""
    metrics = {}
    for iteration, fields in WEIGHT_LINE.findall(output):
        pairs = (field.split(": ") for field in fields.split(" | "))
        metrics[int(iteration)] = {name: float(value) for name, value in pairs}
    return metrics


def checkpoint_tensors(save_dir: Path, iteration: int | None, optimizer: bool = False) -> dict:
    """Global (unsharded) tensors of a torch_dist checkpoint: model weights, optionally Adam's.
    `iteration` None: the `release` checkpoint that `convert_checkpoint.py import-hf` writes."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = "release" if iteration is None else f"iter_{iteration:07d}"
    directory = Path(save_dir, name)
    flat_file = directory.with_suffix(".pt")
    if not flat_file.exists():
        dcp_to_torch_save(directory, flat_file)
    state = torch.load(flat_file, weights_only=False)
    keep = {}
    for name, value in state.items():
        is_weight = isinstance(value, torch.Tensor) and "_extra_state" not in name
        is_optimizer = name.startswith("optimizer")
        if is_weight and (optimizer or not is_optimizer) and "state_machine" not in name:
            keep[name] = value
    return keep
