"""The command line of `python -m megatron_dcod.score`, turned into `ScoreConfig` once.

Megatron's flag names for what Megatron has (`--load`, `--data-path`, `--seq-length`,
`--micro-batch-size`, `--tensor-model-parallel-size`, `--pipeline-model-parallel-size`,
`--bf16`, `--seed`) and the trainer's `--hf-config`; the rest is the scorer's own.
"""

from __future__ import annotations

import argparse

from megatron_dcod.scoring.config import ROLES, ScoreConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dcod.score",
        description="Add teacher (or reference) log-probs to trace datasets with a Megatron "
        "checkpoint, under torchrun/srun with tensor, pipeline and data parallelism.",
        allow_abbrev=False,
    )
    defaults = ScoreConfig((), "", "", 0)
    model = parser.add_argument_group("scoring model")
    model.add_argument("--hf-config", required=True, metavar="DIR", help="its HF config dir")
    model.add_argument("--load", required=True, metavar="DIR", help="its Megatron checkpoint")
    model.add_argument("--tokenizer", default=None, metavar="DIR", help="(default: --hf-config)")
    model.add_argument("--tensor-model-parallel-size", type=int, default=1)
    model.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    precision = model.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 log-softmax)")
    precision.add_argument("--fp16", action="store_true", help="fp16 weights (fp32 log-softmax)")
    model.add_argument("--seed", type=int, default=defaults.seed)

    data = parser.add_argument_group("datasets and batches")
    data.add_argument("--data-path", nargs="+", required=True, metavar="PREFIX")
    data.add_argument("--seq-length", type=int, required=True, help="tokens per packed row")
    data.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    data.add_argument("--pipeline-microbatches", type=int, default=None, metavar="N")
    data.add_argument("--shard-traces", type=int, default=defaults.shard_traces, metavar="N")
    data.add_argument("--logits-chunk-tokens", type=int, default=defaults.logits_chunk_tokens)

    output = parser.add_argument_group("what is written")
    output.add_argument("--as", dest="role", choices=ROLES, default=defaults.role)
    output.add_argument("--topk", type=int, default=0, help="teacher top-k per token")
    output.add_argument("--overwrite", action="store_true", help="replace existing arrays")
    return parser


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    """ScoreConfig from parsed flags, with the checks that need no file."""
    if args.role == "ref" and args.topk:
        raise ValueError("--topk is the teacher's: --as ref writes ref_logprobs only")
    positive = (
        "seq_length", "micro_batch_size", "shard_traces", "logits_chunk_tokens",
        "tensor_model_parallel_size", "pipeline_model_parallel_size",
    )  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.topk < 0 or (args.pipeline_microbatches is not None and args.pipeline_microbatches < 1):
        raise ValueError("--topk must be >= 0 and --pipeline-microbatches >= 1")
    return ScoreConfig(
        data_path=tuple(args.data_path),
        hf_config=args.hf_config,
        load=args.load,
        seq_length=args.seq_length,
        role=args.role,
        topk=args.topk,
        tokenizer=args.tokenizer,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        micro_batch_size=args.micro_batch_size,
        pipeline_microbatches=args.pipeline_microbatches,
        dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        shard_traces=args.shard_traces,
        logits_chunk_tokens=args.logits_chunk_tokens,
        overwrite=args.overwrite,
        seed=args.seed,
    )


def parse_config(argv: list[str]) -> ScoreConfig:
    """Parse and check; a bad combination exits with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
