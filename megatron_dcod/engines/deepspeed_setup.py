"""DeepSpeed's side of the engine: process group, config dict, optimizer and LR schedule.

The optimizer is a torch optimizer handed to `deepspeed.initialize` (DeepSpeed's CPU Adam with
`--offload-optimizer cpu`), with Megatron's parameter groups (no weight decay on biases and
norm weights) and Megatron's own `OptimizerParamScheduler`, stepped in samples as Megatron
steps it, so both engines follow the same learning-rate curve from the same flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_dcod.engines.config import DeepSpeedOptions, OptimizerConfig, ScheduleConfig
from megatron_dcod.platform.launch import adopt_slurm_ranks, free_port

RESERVED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
    "gradient_allreduce_op",
    "managed_gradient_accumulation",
    "zero_optimization.stage",
    "zero_optimization.offload_optimizer",
)
"""--deepspeed-config may not set these: the sampler, optimizer, schedule, precision, ZeRO stage
and the step's gradient arithmetic (a mean over data-parallel ranks of one update per step,
engines/step.py) follow the command line."""


def init_distributed() -> torch.device:
    """Join (or, alone, create) the process group; returns this rank's device. NCCL on GPUs,
    gloo on DeepSpeed's CPU accelerator. Under plain `srun` (one task per GPU, no launcher) the
    rank comes from Slurm's variables; MASTER_ADDR/MASTER_PORT must be exported."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    adopt_slurm_ranks()
    alone = "WORLD_SIZE" not in os.environ  # no launcher: rank 0 of 1, on a port of its own
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()) if alone else "29500")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    accelerator = get_accelerator()
    cpu = accelerator.device_name() == "cpu"
    if not torch.distributed.is_initialized():
        backend = "gloo" if cpu else accelerator.communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if cpu:
        return torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def batch_geometry(schedule: ScheduleConfig, data_parallel: int) -> tuple[int, int]:
    """(global batch, accumulation steps); Megatron's rule global = micro × DP × accumulation."""
    micro = schedule.micro_batch_size
    global_batch = schedule.global_batch_size or micro * data_parallel
    if global_batch % (micro * data_parallel):
        raise ValueError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
            f"{micro} × {data_parallel} data-parallel ranks"
        )
    return global_batch, global_batch // (micro * data_parallel)


def deepspeed_config(
    options: DeepSpeedOptions,
    optimizer: OptimizerConfig,
    micro: int,
    accumulation: int,
    world: int,
    gpu: bool = True,
) -> dict[str, Any]:
    """The DeepSpeed config of the flags, then the entries of --deepspeed-config over it.
    Communication overlaps computation on GPUs only (on the CPU there are no streams to
    overlap on)."""
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": options.offload_optimizer, "pin_memory": True}
    if options.zero_stage >= 2:
        zero |= {"overlap_comm": gpu, "contiguous_gradients": True}
    config = {
        "train_batch_size": micro * accumulation * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optimizer.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": options.bf16},
        "zero_allow_untested_optimizer": True,  # a torch optimizer under ZeRO
        "steps_per_print": 2**31 - 1,  # the engine logs its own lines
        "wall_clock_breakdown": False,
    }
    if options.config_file:
        overrides = json.loads(Path(options.config_file).read_text())
        reserved = [key for key in RESERVED_KEYS if _has_path(overrides, key)]
        if reserved:
            raise ValueError(
                f"{options.config_file}: {reserved} are set by the command line (batch sizes, "
                "--optimizer, --lr-*, --bf16, --zero-stage, --offload-optimizer); remove them "
                "from the file"
            )
        config = _merged(config, overrides)
    return config


def _has_path(config: dict, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in config:
        return False
    return not rest or (isinstance(config[head], dict) and _has_path(config[head], rest))


def _merged(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merged(base[key], value)
        else:
            merged[key] = value
    return merged


def parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Megatron's groups: weight decay on matrices, none on biases and norm weights (1-D)."""
    decayed, plain = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 keeps the shape
            (decayed if len(shape) > 1 else plain).append(parameter)
    groups = [{"params": decayed, "wd_mult": 1.0}, {"params": plain, "wd_mult": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, offload: bool, device):
    """The torch optimizer of --optimizer (DeepSpeedCPUAdam for an offloaded Adam)."""
    groups = parameter_groups(model)
    for group in groups:
        group["weight_decay"] = config.weight_decay * group["wd_mult"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum)
    betas = (config.adam_beta1, config.adam_beta2)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.lr, betas=betas, eps=config.adam_eps)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=betas, eps=config.adam_eps, fused=device.type == "cuda"
    )


def build_scheduler(optimizer, config: OptimizerConfig, train_iters: int, global_batch: int):
    """Megatron's OptimizerParamScheduler, counted in samples (`step(global_batch)` per step)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = (config.lr_decay_iters or train_iters) * global_batch
    if config.lr_warmup_fraction is not None:
        warmup_steps = config.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = config.lr_warmup_iters * global_batch
    return OptimizerParamScheduler(
        optimizer,
        use_checkpoint_opt_param_scheduler=False,  # a resumed run must keep the schedule flags
        init_lr=config.lr_warmup_init,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=train_iters * global_batch,
        wd_incr_style="constant",
    )
