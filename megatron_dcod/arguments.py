"""The only bridge between command-line flags and the configuration dataclasses.

Flag names (docs/design.md, "Command lines"): Megatron's own names where Megatron has the
concept, shared tool names (`--input`, `--output-prefix`, `--tokenizer`, ...), and `--dcod-*`
for the project.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_dcod.config import (
    BASE_LOSSES,
    DCOD_SCOPES,
    NORMALIZATIONS,
    TOPK_MODES,
    WEIGHTINGS,
    CorrectionConfig,
    EvalConfig,
    ExportConfig,
    ImportConfig,
    PreprocessConfig,
    RecordFields,
    ScoringConfig,
    TraceDataConfig,
)
from megatron_dcod.data.engine_records import RECORD_FORMATS
from megatron_dcod.data.sources import SUPERVISED_SOURCES


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
    names.add_argument(
        "--record-format",
        choices=RECORD_FORMATS,
        default="auto",
        help="where teacher log-probs come from: native fields, or the output of vllm, sglang "
        "or an openai-compatible server for the whole rendered sequence (auto: detected)",
    )

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
    scoring.add_argument(
        "--score-backend",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: batched forward passes on --score-device; vllm: offline vLLM prompt "
        "log-probs on --score-tensor-parallel-size visible GPUs",
    )
    scoring.add_argument(
        "--score-tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine (vllm)"
    )
    scoring.add_argument("--score-device", default="cpu", help="cpu, cuda, cuda:N (hf backend)")
    scoring.add_argument("--score-dtype", choices=("fp32", "bf16"), default="fp32")
    scoring.add_argument(
        "--score-batch-tokens",
        type=int,
        default=16384,
        help="hf: padded tokens per scoring forward pass; vllm: trace tokens per generate call",
    )
    return parser


def preprocess_config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """PreprocessConfig from parsed flags, with the cross-flag checks."""
    if args.score_topk and not args.score_with:
        raise ValueError("--score-topk needs --score-with")
    if args.score_backend == "vllm" and not (args.score_with or args.ref_model):
        raise ValueError("--score-backend vllm needs --score-with or --ref-model")
    if args.score_backend == "vllm" and args.score_device != "cpu":
        raise ValueError(
            "--score-device is for --score-backend hf: vLLM runs on the visible GPUs "
            "(choose them with CUDA_VISIBLE_DEVICES)"
        )
    if args.score_tensor_parallel_size != 1 and args.score_backend != "vllm":
        raise ValueError("--score-tensor-parallel-size is for --score-backend vllm")
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
        record_format=args.record_format,
        scoring=ScoringConfig(
            teacher_model=args.score_with,
            ref_model=args.ref_model,
            topk=args.score_topk,
            device=args.score_device,
            dtype=args.score_dtype,
            batch_tokens=args.score_batch_tokens,
            backend=args.score_backend,
            tensor_parallel_size=args.score_tensor_parallel_size,
        ),
    )


def add_dry_run_arg(parser) -> None:
    parser.add_argument(
        "--dcod-dry-run",
        type=int,
        metavar="WORLD_SIZE",
        default=None,
        help="validate the flags for a run of WORLD_SIZE processes and exit: no GPU, data or "
        "process group needed (slurm/train_7b.sh with DRY_RUN=1)",
    )


def requested_dry_run(argv: list[str]) -> int | None:
    """The WORLD_SIZE of `--dcod-dry-run`, read before Megatron (and its imports) are loaded."""
    peek = argparse.ArgumentParser(add_help=False)
    add_dry_run_arg(peek)
    return peek.parse_known_args(argv)[0].dcod_dry_run


def add_dcod_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Project flags of `python -m megatron_dcod.train`, added to Megatron's parser."""
    student = parser.add_argument_group("megatron-dcod student and data")
    student.add_argument(
        "--hf-config", metavar="DIR", required=True, help="dir of the student's HF config.json"
    )
    add_trace_data_args(student)
    add_correction_args(parser)
    return parser


def add_trace_data_args(group) -> None:
    """`--dcod-tokenizer`, `--dcod-no-pack` and `--dcod-dry-run`: both training engines."""
    group.add_argument(
        "--dcod-tokenizer",
        metavar="DIR",
        default=None,
        help="HF tokenizer dir of the run; every dataset's tokenizer fingerprint must match it",
    )
    group.add_argument(
        "--dcod-no-pack",
        action="store_true",
        help="one trace per sequence (padded) instead of packing traces",
    )
    add_dry_run_arg(group)


def add_correction_args(parser: argparse.ArgumentParser) -> None:
    """The `--dcod-*` correction flags: both training engines."""
    dcod = parser.add_argument_group("megatron-dcod correction (docs/method.md)")
    defaults = CorrectionConfig()
    dcod.add_argument(
        "--dcod-weighting", choices=WEIGHTINGS, default=defaults.weighting,
        help="w_t: sft (1), dft (π_θ), iw_sft (trace ratio to π_0), dcod (s·σ((Δ−b)/τ))",
    )  # fmt: skip
    dcod.add_argument(
        "--dcod-base-loss", choices=BASE_LOSSES, default=defaults.base_loss,
        help="ℓ_t: ce (the trace token), kl or todi (the teacher's stored top-k)",
    )  # fmt: skip
    dcod.add_argument(
        "--dcod-scope", choices=DCOD_SCOPES, default=defaults.scope,
        help="Δ of the DCOD weight: the token's, the prefix's running mean, the trace's mean",
    )  # fmt: skip
    dcod.add_argument("--dcod-temperature", type=float, default=defaults.temperature, help="τ")
    dcod.add_argument("--dcod-offset", type=float, default=defaults.offset, help="b")
    dcod.add_argument("--dcod-scale", type=float, default=defaults.scale, help="s")
    dcod.add_argument("--dcod-clip-min", type=float, default=None, help="lower clip of w")
    dcod.add_argument("--dcod-clip-max", type=float, default=None, help="upper clip of w")
    dcod.add_argument(
        "--dcod-normalization", choices=NORMALIZATIONS, default=defaults.normalization,
        help="loss denominator over the step: Σ m (tokens) or Σ m·w (weights)",
    )  # fmt: skip
    dcod.add_argument(
        "--dcod-topk-mode", choices=TOPK_MODES, default=defaults.topk_mode,
        help="kl/todi support: the teacher's k ids renormalized, or the ids + a tail bucket",
    )  # fmt: skip
    dcod.add_argument("--dcod-todi-beta", type=float, default=defaults.todi_beta, help="ToDi's β")
    dcod.add_argument(
        "--dcod-iw-sft-max-weight", type=float, default=defaults.iw_sft_max_weight,
        help="iw-SFT clamps its trace weight to [0, this]",
    )  # fmt: skip
    dcod.add_argument(
        "--dcod-train-sources", type=source_list, default=defaults.train_sources, metavar="LIST",
        help="comma list of student, teacher, inserted (default: all): train only the tokens of "
        "these sources (the datasets' `source` array; others get loss mask 0)",
    )  # fmt: skip


def source_list(text: str) -> tuple[str, ...]:
    """`--dcod-train-sources`: 'teacher,inserted' → ('teacher', 'inserted'), in code order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SUPERVISED_SOURCES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma list of {', '.join(SUPERVISED_SOURCES)} (unknown: {unknown})"
        )
    return tuple(name for name in SUPERVISED_SOURCES if name in names)


def correction_config_from_args(args: argparse.Namespace) -> CorrectionConfig:
    """CorrectionConfig from the `--dcod-*` flags."""
    return CorrectionConfig(
        weighting=args.dcod_weighting,
        base_loss=args.dcod_base_loss,
        scope=args.dcod_scope,
        temperature=args.dcod_temperature,
        offset=args.dcod_offset,
        scale=args.dcod_scale,
        clip_min=args.dcod_clip_min,
        clip_max=args.dcod_clip_max,
        normalization=args.dcod_normalization,
        topk_mode=args.dcod_topk_mode,
        todi_beta=args.dcod_todi_beta,
        iw_sft_max_weight=args.dcod_iw_sft_max_weight,
        train_sources=tuple(args.dcod_train_sources),
    )


def trace_data_config_from_args(
    args: argparse.Namespace, correction: CorrectionConfig
) -> TraceDataConfig:
    """TraceDataConfig from Megatron's --seq-length and the `--dcod-*` data flags."""
    return TraceDataConfig(
        seq_length=args.seq_length,
        pack=not args.dcod_no_pack,
        arrays=correction.required_arrays(),
        tokenizer=args.dcod_tokenizer,
    )


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`tools/convert_checkpoint.py {import-hf,export-hf}`."""
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("import-hf", help="HF safetensors → Megatron checkpoint")
    to_megatron.add_argument("--hf-dir", type=Path, required=True, metavar="DIR")
    to_megatron.add_argument("--out", type=Path, required=True, metavar="CKPT")
    to_megatron.add_argument("--tensor-model-parallel-size", type=int, default=1)
    to_megatron.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    to_megatron.add_argument("--dtype", choices=("bf16", "fp32"))
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_hf = commands.add_parser("export-hf", help="Megatron checkpoint → HF model dir")
    to_hf.add_argument("--ckpt", type=Path, required=True, metavar="CKPT")
    to_hf.add_argument("--hf-template", type=Path, required=True, metavar="DIR")
    to_hf.add_argument("--out", type=Path, required=True, metavar="DIR")
    to_hf.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    to_hf.add_argument("--max-shard-size", type=_byte_size, default="5GB", metavar="SIZE")
    return parser


def _byte_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.upper().rstrip("KMGIB")
    try:
        return int(float(number) * units[text.upper()[len(number) :]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


def convert_config_from_args(args: argparse.Namespace) -> ImportConfig | ExportConfig:
    if args.command == "import-hf":
        return ImportConfig(
            hf_dir=args.hf_dir,
            out=args.out,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
    return ExportConfig(
        ckpt=args.ckpt,
        hf_template=args.hf_template,
        out=args.out,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
    )


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`tools/eval_math.py`; fields documented on EvalConfig."""
    data = parser.add_argument_group("data")
    data.add_argument("--benchmark", required=True, metavar="NAME")
    data.add_argument("--data", required=True, metavar="PATH_OR_HF_NAME")
    data.add_argument("--split")
    data.add_argument("--limit", type=int)
    data.add_argument("--problem-field")
    data.add_argument("--answer-field")
    data.add_argument("--gold-vs-gold", action="store_true")
    model = parser.add_argument_group("model and output")
    model.add_argument("--model", type=Path, metavar="DIR")
    model.add_argument("--out", type=Path, metavar="DIR")
    model.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    model.add_argument("--device")
    model.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    model.add_argument("--batch-size", type=int)
    model.add_argument("--tensor-model-parallel-size", type=int, default=1)
    sampling = parser.add_argument_group("prompt and sampling (default: the benchmark's)")
    sampling.add_argument("--system-prompt")
    sampling.add_argument("--prompt-template", default=EvalConfig.prompt_template)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--max-new-tokens", type=int)
    sampling.add_argument("--samples", "-k", type=int)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--grading-timeout", type=int, default=5)
    return parser


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    if args.model is None and not args.gold_vs_gold:
        raise SystemExit("error: --model is required (unless --gold-vs-gold)")
    model_name = args.model.name if args.model else "gold"
    return EvalConfig(
        model=args.model,
        benchmark=args.benchmark,
        data=args.data,
        out=args.out or Path("runs", "eval", model_name, args.benchmark),
        split=args.split,
        limit=args.limit,
        problem_field=args.problem_field,
        answer_field=args.answer_field,
        system_prompt=args.system_prompt,
        prompt_template=args.prompt_template,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        seed=args.seed,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        tensor_parallel_size=args.tensor_model_parallel_size,
        grading_timeout=args.grading_timeout,
        gold_vs_gold=args.gold_vs_gold,
    )
