"""Train the student: `python -m megatron_dcod.train` or `torchrun ... -m megatron_dcod.train`.

The entry point of DESIGN.md §5 on `megatron.training.pretrain`: Megatron's flags for all it
has, `--hf-config DIR` for the architecture and `--dcod-*` for the correction. This module is
the only place that reads Megatron's global arguments; it turns them into the project's
configs once and hands those to the library code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
from functools import partial
from pathlib import Path

from megatron_dcod.arguments import requested_dry_run
from megatron_dcod.platform.compat import (
    ensure_python_compat,
    make_distributed_optimizer_resumable,
    use_prebuilt_dataset_helpers,
)
from megatron_dcod.platform.cpu import apply_cpu_mode, report_cuda_available, skip_jit_warmup

UNFUSED_FLAGS = (
    "--transformer-impl=local",
    "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--no-masked-softmax-fusion",
    "--no-rope-fusion",
)
"""Megatron's kernel fusions come from Transformer Engine or Apex; without both they are off."""
CPU_FLAGS = ("--distributed-backend=gloo", "--use-cpu-initialization", *UNFUSED_FLAGS)
"""Megatron flags the CPU mode needs (DESIGN.md §3, §5); the user's flags come after them."""
ALWAYS_FLAGS = ("--calculate-per-token-loss",)
"""The loss is normalized over the whole step (METHOD.md §1), Megatron's per-token mode."""
RESOLVED_CONFIG_NAME = "dcod_config.json"


def megatron_argv(argv: list[str], cpu: bool) -> list[str]:
    """The command line Megatron parses: architecture flags from --hf-config, then the user's."""
    from megatron_dcod.models.student import load_hf_config, megatron_architecture_flags

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--hf-config", required=True, metavar="DIR")
    hf_dir = peek.parse_known_args(argv)[0].hf_config
    prefix = megatron_architecture_flags(load_hf_config(hf_dir)) + list(ALWAYS_FLAGS)
    if cpu:
        prefix += CPU_FLAGS
    elif not fused_kernels_available():
        prefix += UNFUSED_FLAGS
    return prefix + list(argv)


def fused_kernels_available() -> bool:
    """Whether Transformer Engine or Apex (Megatron's sources of fused kernels) is installed."""
    from importlib.util import find_spec

    from megatron_dcod.models.student import transformer_engine_available

    return transformer_engine_available() or find_spec("apex") is not None


def write_resolved_config(args, correction, data, hf_config) -> Path | None:
    """`{--save}/dcod_config.json`: every flag after Megatron's validation, and our configs."""
    if not args.save or args.rank != 0:
        return None
    resolved = {
        "megatron": {k: v for k, v in vars(args).items() if _is_json(v)},
        "correction": dataclasses.asdict(correction),
        "data": dataclasses.asdict(data),
        "hf_config": hf_config.to_dict(),
    }
    path = Path(args.save, RESOLVED_CONFIG_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    temporary.replace(path)
    return path


def _is_json(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def check_fp8(args) -> bool:
    """Whether to use Transformer Engine; FP8 without TE is an error."""
    from megatron_dcod.models.student import transformer_engine_available

    has_te = transformer_engine_available()
    if args.fp8 and not has_te:
        raise SystemExit(
            f"--fp8-format {args.fp8} needs Transformer Engine, which is not installed "
            "(pip install megatron-dcod[gpu])"
        )
    return has_te and args.transformer_impl == "transformer_engine"


def check_packing(args, pack: bool) -> None:
    """Packed micro-batches travel as one THD row of b·s tokens; pipeline stages exchange
    activations shaped [seq_length, micro_batch_size, hidden], so with PP > 1 that row must be
    the whole micro-batch (Megatron's own convention for packed sequences)."""
    if pack and args.pipeline_model_parallel_size > 1 and args.micro_batch_size != 1:
        raise SystemExit(
            "packed traces with --pipeline-model-parallel-size > 1 need --micro-batch-size 1 "
            "(raise --seq-length instead), or --dcod-no-pack"
        )
    if args.context_parallel_size > 1:
        raise SystemExit("--context-parallel-size > 1 is not supported yet")


def dry_run(argv: list[str], world_size: int) -> str:
    """Check a command line as a run of `world_size` processes would, without starting one:
    Megatron's parser and its validation (TP × PP × DP = world size, global batch = micro ×
    DP × accumulation, flag combinations), then ours (architecture, correction and data
    configs, packing). No dataset, GPU or process group is touched; without a GPU (a login
    node) the CPU mode answers Megatron's device checks as a Hopper-class GPU, and the flags
    are those this machine would run (the unfused ones without Transformer Engine). Returns a
    one-line summary; a bad flag exits non-zero with the parser's message."""
    apply_cpu_mode()  # a no-op where CUDA is available; makes megatron importable on 3.11
    from megatron.training.arguments import parse_args, validate_args

    from megatron_dcod.arguments import (
        add_dcod_args,
        correction_config_from_args,
        trace_data_config_from_args,
    )
    from megatron_dcod.models.student import check_sequence_length, load_hf_config

    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    sys.argv = [sys.argv[0], *megatron_argv(argv, cpu=False)]
    try:  # Megatron prints every argument on rank 0: not part of the summary
        with contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(extra_args_provider=add_dcod_args)  # argparse errors exit here
            validate_args(args)
    except (AssertionError, ValueError, RuntimeError) as error:  # Megatron's rules
        raise SystemExit(f"megatron rejects the flags: {error}") from None
    check_sequence_length(load_hf_config(args.hf_config), args.seq_length)
    correction = correction_config_from_args(args)
    check_packing(args, trace_data_config_from_args(args, correction).pack)
    return dry_run_summary(args, world_size, correction.weighting)


def dry_run_summary(args, world_size: int, weighting: str) -> str:
    """One line: the layout, the batch arithmetic, precision and correction of a checked run."""
    dp, micro = args.data_parallel_size, args.micro_batch_size
    accumulation = args.global_batch_size // (micro * dp)
    fp8 = f"fp8 {args.fp8}" if args.fp8 else "no fp8"
    if args.fp8 and not fused_kernels_available():
        fp8 += " (note: needs Transformer Engine, which this machine lacks)"
    return (
        f"flags OK for {world_size} processes: TP {args.tensor_model_parallel_size} × "
        f"PP {args.pipeline_model_parallel_size} × DP {dp}; global batch "
        f"{args.global_batch_size} = micro {micro} × DP {dp} × {accumulation} accumulation "
        f"steps; seq length {args.seq_length}; {args.params_dtype}, {fp8}; weighting {weighting}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    world_size = requested_dry_run(argv)
    if world_size is not None:
        try:
            print(dry_run(argv, world_size), flush=True)
        except ValueError as error:  # --hf-config, --seq-length, --dcod-* values
            raise SystemExit(f"error: {error}") from None
        return
    cpu = apply_cpu_mode()
    if cpu:  # Megatron checks it for TP/CP; it means nothing without CUDA
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    ensure_python_compat()
    use_prebuilt_dataset_helpers()
    make_distributed_optimizer_resumable()
    sys.argv = [sys.argv[0], *megatron_argv(argv, cpu)]

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dcod.arguments import (
        add_dcod_args,
        correction_config_from_args,
        trace_data_config_from_args,
    )
    from megatron_dcod.models.student import check_sequence_length, load_hf_config
    from megatron_dcod.training.providers import blend_prefixes, preflight

    args = parse_and_validate_args(extra_args_provider=add_dcod_args)
    hf_config = load_hf_config(args.hf_config)
    use_te = check_fp8(args)
    check_sequence_length(hf_config, args.seq_length)
    correction = correction_config_from_args(args)
    data, tokenizer = preflight(
        blend_prefixes(args.data_path),
        trace_data_config_from_args(args, correction),
        hf_config.vocab_size,
    )
    check_packing(args, data.pack)
    write_resolved_config(args, correction, data, hf_config)
    if cpu:
        report_cuda_available()  # pretrain() asserts CUDA; the CPU mode serves it
        skip_jit_warmup()
    pretrain(
        pretrain_cfg_container_from_args(args),
        dataset_provider(args, data, tokenizer),
        ModelType.encoder_or_decoder,
        forward_step(args, correction, data.pack),
        model_provider=model_provider(hf_config, use_te),
    )


def model_provider(hf_config, use_transformer_engine: bool):
    """Megatron's model-provider extension point for the HF-config student."""
    from megatron.training import get_args

    from megatron_dcod.models.student import student_from_args

    def provide(
        pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None
    ):
        return student_from_args(
            get_args(), hf_config, use_transformer_engine,
            pre_process, post_process, vp_stage, pg_collection,
        )  # fmt: skip

    return provide


def dataset_provider(args, data, tokenizer):
    """Megatron's dataset-provider extension point: blended, split trace sequences."""
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_dcod.training.providers import build_datasets

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    provide = partial(
        build_datasets,
        data=data,
        tokenizer=tokenizer,
        seed=args.seed,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
    )
    provide.is_distributed = True  # every rank reads its own batches (DESIGN.md §5)
    return provide


def forward_step(args, correction, pack: bool):
    """The ForwardStep with its weight metrics wired to Megatron's logging state."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import get_args
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    from megatron_dcod.training.metrics import WeightMetrics
    from megatron_dcod.training.step import ForwardStep

    metrics = WeightMetrics(
        log_interval=args.log_interval,
        num_microbatches=get_num_microbatches,
        next_iteration=lambda: get_args().curr_iteration + 1,
        writers=lambda: (get_tensorboard_writer(), get_wandb_writer()),
        data_parallel_group=lambda: parallel_state.get_data_parallel_group(
            with_context_parallel=True
        ),
        is_reporting_rank=args.rank == args.world_size - 1,
    )
    return ForwardStep(correction=correction, pack=pack, metrics=metrics)


if __name__ == "__main__":
    main()
