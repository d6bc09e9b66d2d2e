"""What a training run checks before step 1, and its dry run without data or devices.

`prepare` turns Megatron's validated arguments into the project's configs once (the
`TrainingRun` the providers receive) and refuses, before any step: a bad `--hf-config` or
sequence length, FP8 without Transformer Engine, layouts the trainer does not support, and
datasets that are damaged, lack an array the correction needs, were tokenized differently, or
hold ids the student's vocabulary cannot embed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from megatron_dcod.arguments import correction_config_from_args, trace_data_config_from_args
from megatron_dcod.config import CorrectionConfig, TraceDataConfig
from megatron_dcod.data.trace_format import (
    TokenizerFingerprint,
    TraceDataset,
    TraceFormatError,
    read_meta,
)

RESOLVED_CONFIG_NAME = "dcod_config.json"
SOURCE_NEEDED = (
    ": --dcod-train-sources other than all needs the per-token `source` array, which "
    "preprocessing writes from records with `segments` (docs/data_format.md)"
)


@dataclass(frozen=True)
class TrainingRun:
    """What the training entry resolves from Megatron's arguments, once, for the providers."""

    hf_config: Any
    """The student's HF config (architecture, vocabulary size)."""
    correction: CorrectionConfig
    """The weighting and base loss."""
    data: TraceDataConfig
    """How traces become sequences, and the arrays to load."""
    tokenizer: TokenizerFingerprint
    """The tokenizer every dataset of the run was made with."""
    use_transformer_engine: bool
    """Build the student with Transformer Engine's layer spec."""


def check_flags(args: argparse.Namespace) -> tuple[Any, CorrectionConfig, TraceDataConfig]:
    """(HF config, correction, data config) of the flags; what the dry run checks too."""
    from megatron_dcod.models.student import check_sequence_length, load_hf_config

    hf_config = load_hf_config(args.hf_config)
    check_sequence_length(hf_config, args.seq_length)
    correction = correction_config_from_args(args)
    data = trace_data_config_from_args(args, correction)
    check_layout(args, data.pack)
    return hf_config, correction, data


def prepare(args: argparse.Namespace) -> TrainingRun:
    """Every check of the module doc; raises ValueError / SystemExit naming what is wrong."""
    hf_config, correction, data = check_flags(args)
    use_transformer_engine = check_fp8(args)
    data, tokenizer = check_datasets(dataset_prefixes(args), data, hf_config.vocab_size)
    return TrainingRun(hf_config, correction, data, tokenizer, use_transformer_engine)


def dataset_prefixes(args: argparse.Namespace) -> list[str]:
    """Every trace dataset of `--data-path` (with blend weights) or the per-split paths."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    blends = [blend] if blend else [split for split in blend_per_split or () if split]
    prefixes = [prefix for prefixes, _ in blends for prefix in prefixes]
    if not prefixes:
        raise ValueError("--data-path is required: one or more trace dataset prefixes")
    return list(dict.fromkeys(prefixes))


def check_datasets(
    prefixes: list[str], data: TraceDataConfig, model_vocab_size: int
) -> tuple[TraceDataConfig, TokenizerFingerprint]:
    """Open every dataset (sizes, alignment, tokenizer) and check it against the run; returns
    the data config to use (with `teacher_logprobs` for the mean-Δ diagnostic and `source` for
    the per-source ones when every dataset has them) and the run's tokenizer fingerprint."""
    if data.tokenizer:
        from megatron_dcod.data.chat import ChatTokenizer

        reference = ChatTokenizer(data.tokenizer).fingerprint
    else:  # the first dataset's; the others must agree with it
        reference = TokenizerFingerprint(**read_meta(prefixes[0])["tokenizer"])
    datasets = [TraceDataset(prefix, tokenizer=reference) for prefix in prefixes]
    for dataset in datasets:
        missing = [name for name in data.arrays if not dataset.has(name)]
        if missing:
            why = SOURCE_NEEDED if "source" in missing else ""
            raise TraceFormatError(
                f"{dataset.prefix}: the correction needs {missing}, which this trace dataset "
                f"lacks (it has {dataset.meta['arrays']}){why}"
            )
        check_vocabulary(dataset, model_vocab_size)
    for name in ("teacher_logprobs", "source"):  # diagnostics, loaded when every dataset has it
        if all(dataset.has(name) for dataset in datasets):
            data = replace(data, arrays=tuple(dict.fromkeys(data.arrays + (name,))))
    return data, reference


def check_vocabulary(dataset: TraceDataset, model_vocab_size: int) -> None:
    """Refuse a dataset whose tokenizer or ids do not fit the student's vocabulary."""
    tokenizer_size = dataset.meta["tokenizer"]["vocab_size"]
    if tokenizer_size > model_vocab_size:
        raise TraceFormatError(
            f"{dataset.prefix}: tokenizer vocabulary of {tokenizer_size} does not fit the "
            f"student's vocab_size {model_vocab_size} (--hf-config)"
        )
    for name in ("tokens", "teacher_topk_ids"):
        largest = dataset.max_id(name) if dataset.has(name) else -1
        if largest >= model_vocab_size:
            raise TraceFormatError(
                f"{dataset.prefix}: {name} holds id {largest}, beyond the student's "
                f"vocab_size {model_vocab_size} (--hf-config)"
            )


def check_fp8(args: argparse.Namespace) -> bool:
    """Whether to use Transformer Engine; FP8 without TE is an error."""
    from megatron_dcod.models.student import transformer_engine_available

    has_te = transformer_engine_available()
    if args.fp8 and not has_te:
        raise SystemExit(
            f"--fp8-format {args.fp8} needs Transformer Engine, which is not installed "
            "(pip install megatron-dcod[gpu])"
        )
    return has_te and args.transformer_impl == "transformer_engine"


def check_layout(args: argparse.Namespace, pack: bool) -> None:
    """Packed micro-batches travel as one THD row of b·s tokens; pipeline stages exchange
    activations shaped [seq_length, micro_batch_size, hidden], so with PP > 1 that row must be
    the whole micro-batch (Megatron's own convention for packed sequences). Context parallelism
    would split the traces' per-token arrays, which the loss does not do."""
    if pack and args.pipeline_model_parallel_size > 1 and args.micro_batch_size != 1:
        raise SystemExit(
            "packed traces with --pipeline-model-parallel-size > 1 need --micro-batch-size 1 "
            "(raise --seq-length instead), or --dcod-no-pack"
        )
    if args.context_parallel_size > 1:
        raise SystemExit("--context-parallel-size > 1 is not supported")


def dry_run(flags: list[str], world_size: int) -> str:
    """Check a command line as a run of `world_size` processes would, without starting one:
    Megatron's parser and its validation (TP × PP × DP = world size, global batch = micro ×
    DP × accumulation, flag combinations), then ours (architecture, correction and data
    configs, layout). No dataset, GPU or process group is touched; without a GPU (a login
    node) the CPU mode answers Megatron's device checks as a Hopper-class GPU, and the flags
    are those this machine would run (the unfused ones without Transformer Engine). Returns a
    one-line summary; a bad flag exits non-zero with the parser's message."""
    from megatron_dcod.megatron import argv, patches
    from megatron_dcod.models.student import transformer_engine_available

    with patches.applied(patches.LIBRARY):
        args = argv.parse(flags, cpu=False, world_size=world_size, quiet=True)
        _, correction, _ = check_flags(args)
    dp, micro = args.data_parallel_size, args.micro_batch_size
    accumulation = args.global_batch_size // (micro * dp)
    fp8 = f"fp8 {args.fp8}" if args.fp8 else "no fp8"
    if args.fp8 and not transformer_engine_available():
        fp8 += " (note: needs Transformer Engine, which this machine lacks)"
    return (
        f"flags OK for {world_size} processes: TP {args.tensor_model_parallel_size} × "
        f"PP {args.pipeline_model_parallel_size} × DP {dp}; global batch "
        f"{args.global_batch_size} = micro {micro} × DP {dp} × {accumulation} accumulation "
        f"steps; seq length {args.seq_length}; {args.params_dtype}, {fp8}; weighting "
        f"{correction.weighting}"
    )


def write_resolved_config(args: argparse.Namespace, run: TrainingRun) -> Path | None:
    """`{--save}/dcod_config.json`: every flag after Megatron's validation, and our configs."""
    if not args.save or args.rank != 0:
        return None
    resolved = {
        "megatron": {key: value for key, value in vars(args).items() if _is_json(value)},
        "correction": asdict(run.correction),
        "data": asdict(run.data),
        "hf_config": run.hf_config.to_dict(),
    }
    return write_resolved(args.save, resolved)


def write_resolved(save_dir: str, resolved: dict[str, Any]) -> Path:
    """`{save_dir}/dcod_config.json`, replaced atomically (both engines)."""
    path = Path(save_dir, RESOLVED_CONFIG_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    temporary.replace(path)
    return path


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
