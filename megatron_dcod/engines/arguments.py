"""The command line of `python -m megatron_dcod.train_hf`, turned into `HFTrainConfig` once.

Every concept both engines share has the Megatron engine's flag name and Megatron's default
(`--data-path`, `--lr`, `--micro-batch-size`, ..., every `--dcod-*` flag); what only DeepSpeed
has is named after it (`--zero-stage`, `--offload-optimizer`, `--deepspeed-config`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_dcod.arguments import (
    add_correction_args,
    add_trace_data_args,
    correction_config_from_args,
    trace_data_config_from_args,
)
from megatron_dcod.engines.config import (
    LR_DECAY_STYLES,
    OPTIMIZERS,
    ZERO_STAGES,
    CheckpointConfig,
    DataSourceConfig,
    DeepSpeedOptions,
    HFTrainConfig,
    OptimizerConfig,
    ScheduleConfig,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dcod.train_hf",
        description="Train a Hugging Face causal LM on trace datasets with DeepSpeed ZeRO and "
        "the project's corrections (README: Training with DeepSpeed).",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("student and data")
    model.add_argument("--hf-model", required=True, metavar="DIR", help="HF model dir")
    model.add_argument("--data-path", nargs="*", default=None, help="[weight] prefix ...")
    for split in ("train", "valid", "test"):
        model.add_argument(f"--{split}-data-path", nargs="*", default=None)
    model.add_argument("--split", default=None, help="train,valid,test shares (98,2,0)")
    model.add_argument("--data-cache-path", default=None)
    model.add_argument("--num-workers", type=int, default=2)
    model.add_argument("--seq-length", type=int, required=True)
    add_trace_data_args(model)
    _add_optimizer_args(parser.add_argument_group("optimizer and schedule"))
    _add_schedule_args(parser.add_argument_group("batches and intervals"))
    _add_deepspeed_args(parser.add_argument_group("DeepSpeed"))
    _add_checkpoint_args(parser.add_argument_group("checkpoints and logs"))
    add_correction_args(parser)
    return parser


def _add_optimizer_args(group) -> None:
    defaults = OptimizerConfig()
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    group.add_argument("--lr", type=float, required=True)
    group.add_argument("--min-lr", type=float, default=defaults.min_lr)
    group.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=defaults.lr_decay_style)
    group.add_argument("--lr-decay-iters", type=int, default=None)
    group.add_argument("--lr-warmup-fraction", type=float, default=None)
    group.add_argument("--lr-warmup-iters", type=int, default=defaults.lr_warmup_iters)
    group.add_argument("--lr-warmup-init", type=float, default=defaults.lr_warmup_init)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--adam-beta1", type=float, default=defaults.adam_beta1)
    group.add_argument("--adam-beta2", type=float, default=defaults.adam_beta2)
    group.add_argument("--adam-eps", type=float, default=defaults.adam_eps)
    group.add_argument("--sgd-momentum", type=float, default=defaults.sgd_momentum)
    group.add_argument("--clip-grad", type=float, default=defaults.clip_grad)


def _add_schedule_args(group) -> None:
    defaults = ScheduleConfig()
    group.add_argument("--micro-batch-size", type=int, required=True)
    group.add_argument("--global-batch-size", type=int, default=None)
    group.add_argument("--train-iters", type=int, required=True)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--log-interval", type=int, default=defaults.log_interval)
    group.add_argument("--eval-interval", type=int, default=defaults.eval_interval)
    group.add_argument("--eval-iters", type=int, default=defaults.eval_iters)
    group.add_argument("--exit-interval", type=int, default=None)


def _add_deepspeed_args(group) -> None:
    defaults = DeepSpeedOptions()
    group.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, default=defaults.zero_stage)
    group.add_argument("--offload-optimizer", choices=("cpu",), default=None)
    group.add_argument("--gradient-checkpointing", action="store_true")
    group.add_argument("--bf16", action="store_true")
    group.add_argument(
        "--deepspeed-config", metavar="FILE", default=None,
        help="DeepSpeed JSON whose entries override the generated config",
    )  # fmt: skip
    group.add_argument(
        "--logits-chunk-tokens", type=int, default=defaults.logits_chunk_tokens,
        help="tokens per chunk of the output layer + log-softmax (memory of the logits)",
    )  # fmt: skip
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help="(deepspeed)")


def _add_checkpoint_args(group) -> None:
    group.add_argument("--save", default=None, metavar="DIR")
    group.add_argument("--load", default=None, metavar="DIR")
    group.add_argument("--save-interval", type=int, default=None)
    group.add_argument("--save-hf", default=None, metavar="DIR", help="default: {save}/hf")
    group.add_argument("--save-hf-interval", type=int, default=None)
    group.add_argument("--tensorboard-dir", default=None, metavar="DIR")
    group.add_argument(
        "--exit-signal-handler", action="store_true",
        help="on SIGTERM finish the step, save a checkpoint and exit",
    )  # fmt: skip


def parse_config(argv: list[str]) -> HFTrainConfig:
    """HFTrainConfig of a command line; exits with the parser's message on a bad flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as error:
        parser.error(str(error))


def config_from_args(args: argparse.Namespace) -> HFTrainConfig:
    """The dataclasses of parsed flags, with the cross-flag checks."""
    per_split = (args.train_data_path, args.valid_data_path, args.test_data_path)
    if not args.data_path and not any(per_split):
        raise ValueError("--data-path (or --train/valid/test-data-path) is required")
    for name in ("micro_batch_size", "train_iters", "log_interval", "logits_chunk_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.offload_optimizer and args.zero_stage == 0:
        raise ValueError("--offload-optimizer needs --zero-stage 1, 2 or 3")
    if args.offload_optimizer and args.optimizer != "adam":
        raise ValueError("--offload-optimizer runs DeepSpeed's CPU Adam: it needs --optimizer adam")
    if args.bf16 and args.zero_stage == 0:  # DeepSpeed's bf16 wrapper at stage 0 takes an
        # optimizer step on zero gradients at start-up (weight decay, Adam's step count)
        raise ValueError("--bf16 needs --zero-stage 1, 2 or 3")
    if args.save_hf and Path(args.save_hf).resolve() == Path(args.hf_model).resolve():
        raise ValueError("--save-hf must not be --hf-model (the export replaces its dir)")
    correction = correction_config_from_args(args)
    return HFTrainConfig(
        hf_model=args.hf_model,
        data=trace_data_config_from_args(args, correction),
        sources=DataSourceConfig(
            data_path=tuple(args.data_path or ()),
            train_data_path=_tuple_or_none(args.train_data_path),
            valid_data_path=_tuple_or_none(args.valid_data_path),
            test_data_path=_tuple_or_none(args.test_data_path),
            split=args.split,
            data_cache_path=args.data_cache_path,
            num_workers=args.num_workers,
        ),
        correction=correction,
        optimizer=OptimizerConfig(
            **{name: getattr(args, name) for name in OptimizerConfig.__dataclass_fields__}
        ),
        deepspeed=DeepSpeedOptions(
            zero_stage=args.zero_stage,
            offload_optimizer=args.offload_optimizer,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=args.bf16,
            config_file=args.deepspeed_config,
            logits_chunk_tokens=args.logits_chunk_tokens,
        ),
        schedule=ScheduleConfig(
            **{name: getattr(args, name) for name in ScheduleConfig.__dataclass_fields__}
        ),
        checkpoint=CheckpointConfig(
            **{name: getattr(args, name) for name in CheckpointConfig.__dataclass_fields__}
        ),
    )


def _tuple_or_none(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values else None
