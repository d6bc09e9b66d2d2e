"""The only bridge between command-line flags and the configuration dataclasses.

Flag names follow DESIGN.md §5: Megatron's own names where Megatron has the concept, shared tool
names (`--input`, `--output-prefix`, `--tokenizer`, ...), and `--dcod-*` for the project.
"""

from __future__ import annotations

import argparse

from megatron_dcod.config import PreprocessConfig, RecordFields, ScoringConfig


def add_preprocess_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of tools/preprocess_traces.py."""
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="JSONL / JSON / Parquet files or HF dataset dirs",
    )
    io.add_argument("--output-prefix", required=True, help="prefix of the dataset files")
    io.add_argument("--tokenizer", required=True, metavar="DIR", help="student HF tokenizer dir")
    io.add_argument("--split", default="train", help="split of HF dataset dirs")
    io.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    io.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed or invalid records (counted in meta.json)",
    )
    io.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    io.add_argument(
        "--shard-records",
        type=int,
        default=10000,
        help="records per resumable shard (an interrupted run resumes after the last)",
    )

    length = parser.add_argument_group("length")
    length.add_argument("--max-seq-length", type=int, default=None, help="longest trace kept")
    length.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        default="truncate",
        help="what to do with longer traces",
    )

    names = parser.add_argument_group("record field names")
    for name, default in vars(RecordFields()).items():
        names.add_argument(f"--{name.replace('_', '-')}-field", default=default, metavar="NAME")

    scoring = parser.add_argument_group("scoring with HF models (when records carry no log-probs)")
    scoring.add_argument(
        "--score-with",
        metavar="MODEL_DIR",
        default=None,
        help="teacher model that computes teacher_logprobs",
    )
    scoring.add_argument(
        "--ref-model",
        metavar="MODEL_DIR",
        default=None,
        help="initial student that computes ref_logprobs (iw-SFT)",
    )
    scoring.add_argument("--score-topk", type=int, default=0, help="also store the teacher top-k")
    scoring.add_argument("--score-device", default="cpu", help="cpu, cuda, cuda:N")
    scoring.add_argument("--score-dtype", choices=("fp32", "bf16"), default="fp32")
    scoring.add_argument(
        "--score-batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per scoring forward pass",
    )
    return parser


def preprocess_config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """PreprocessConfig from parsed flags, with the cross-flag checks."""
    if args.score_topk and not args.score_with:
        raise ValueError("--score-topk needs --score-with")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise ValueError("--max-seq-length must be at least 2")
    if args.workers < 1 or args.shard_records < 1:
        raise ValueError("--workers and --shard-records must be at least 1")
    fields = RecordFields(**{name: getattr(args, f"{name}_field") for name in vars(RecordFields())})
    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        fields=fields,
        split=args.split,
        max_seq_length=args.max_seq_length,
        overlong=args.overlong,
        workers=args.workers,
        shard_records=args.shard_records,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        scoring=ScoringConfig(
            teacher_model=args.score_with,
            ref_model=args.ref_model,
            topk=args.score_topk,
            device=args.score_device,
            dtype=args.score_dtype,
            batch_tokens=args.score_batch_tokens,
        ),
    )
