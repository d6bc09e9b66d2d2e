"""Configuration dataclasses. Built from CLI flags once (megatron_dcod/arguments.py), then passed
explicitly; library code never reads global arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_dcod.data.sources import SUPERVISED_SOURCES


@dataclass(frozen=True)
class RecordFields:
    """Names of the fields of an input record (docs/data_format.md, "Input records")."""

    messages: str = "messages"
    """Chat list of {role, content}; used when present, else prompt + response."""
    prompt: str = "prompt"
    """The user turn of a prompt/response record."""
    response: str = "response"
    """The assistant turn of a prompt/response record (the teacher's trace)."""
    system: str = "system"
    """Optional system prompt of a prompt/response record."""
    teacher_logprobs: str = "teacher_logprobs"
    """Teacher log-prob of each supervised token (every assistant turn, in order)."""
    teacher_token_ids: str = "teacher_token_ids"
    """The token ids those log-probs belong to; must equal the student tokenization."""
    teacher_topk: str = "teacher_topk"
    """Per supervised token, the teacher's top-k as [{id, logprob}, ...]."""
    segments: str = "segments"
    """Who wrote which part of the response: [{source, text}, ...], source one of student,
    teacher, inserted, the texts concatenating to the (only) assistant turn's content."""


@dataclass(frozen=True)
class ScoringConfig:
    """How to compute log-probs with an HF causal LM (model dir) when the records carry none."""

    teacher_model: str | None = None
    """HF model dir that scores teacher log-probs (replaces any the records carry)."""
    ref_model: str | None = None
    """HF model dir of the initial student; its log-probs become `ref_logprobs` (iw-SFT)."""
    topk: int = 0
    """Also store the teacher's top-k ids and log-probs per token (0: none)."""
    device: str = "cpu"
    """Torch device of the scoring models ("cpu", "cuda", "cuda:1", ...); hf backend only."""
    dtype: str = "fp32"
    """Weights dtype of the scoring models: "fp32" or "bf16" (log-softmax is always fp32)."""
    batch_tokens: int = 16384
    """hf: padded tokens per forward pass (batch size × longest trace in the batch); vllm:
    trace tokens per generate call (vLLM schedules its own batches inside a call)."""
    backend: str = "hf"
    """Which engine scores: "hf" (batched forward passes, inference/trace_scorer.py) or "vllm"
    (offline vLLM prompt log-probs on the visible GPUs, the raw distribution at temperature 1,
    inference/vllm_scorer.py)."""
    tensor_parallel_size: int = 1
    """vllm: GPUs each vLLM engine splits its model over (`tensor_parallel_size` of vllm.LLM)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """tools/preprocess_traces.py: teacher traces in, one trace dataset (data_format.md) out."""

    inputs: tuple[str, ...]
    """JSONL / JSON / Parquet files or HF dataset dirs, read in the order given."""
    output_prefix: str
    """Prefix of the dataset files (`{prefix}_tokens.bin`, `{prefix}.meta.json`, ...)."""
    tokenizer: str
    """Local HF tokenizer dir of the student."""
    fields: RecordFields = field(default_factory=RecordFields)
    """Field names of the input records."""
    split: str = "train"
    """Split to read from HF dataset dirs."""
    max_seq_length: int | None = None
    """Longest trace kept, in tokens (None: no limit)."""
    overlong: str = "truncate"
    """What to do with a longer trace: "truncate" (keep its head) or "drop"."""
    workers: int = 1
    """Tokenizer processes (1: tokenize in the main process)."""
    shard_records: int = 10000
    """Records per resumable shard: an interrupted run resumes after the last finished shard."""
    skip_bad: bool = False
    """Skip malformed or invalid records (counted in meta.json) instead of failing."""
    overwrite: bool = False
    """Rebuild even if an up-to-date dataset exists at the prefix."""
    record_format: str = "auto"
    """Where a record's teacher log-probs come from: "native" (teacher_logprobs /
    teacher_token_ids / teacher_topk fields), "vllm", "sglang" or "openai" (an inference engine's
    output for the whole rendered sequence, data/engine_records.py), or "auto" (native fields if
    present, else the engine format whose fields the record has)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Teacher / reference scoring with HF models (HF or vLLM backend)."""


WEIGHTINGS = ("sft", "dft", "iw_sft", "dcod")
BASE_LOSSES = ("ce", "kl", "todi")
DCOD_SCOPES = ("token", "prefix", "sequence")
NORMALIZATIONS = ("tokens", "weights")
TOPK_MODES = ("renormalize", "tail")


@dataclass(frozen=True)
class CorrectionConfig:
    """Which per-token weight multiplies which token loss (docs/method.md); `--dcod-*` flags."""

    weighting: str = "sft"
    """w_t: "sft" (1), "dft" (π_θ), "iw_sft" (sequence ratio to π_0), "dcod" (docs/method.md)."""
    base_loss: str = "ce"
    """ℓ_t: "ce" (cross-entropy of the trace token), "kl" (top-k KD), "todi" (top-k ToDi)."""
    scope: str = "token"
    """DCOD ratio scope: "token" (Δ_t), "prefix" (running mean of Δ), "sequence" (trace mean)."""
    temperature: float = 4.0
    """DCOD τ: w = s·σ((Δ − b)/τ). 4, not 1: at τ = 1 a student far from the teacher gives
    the tokens it does not support (a step's result, say) w ≈ 0 and never learns them
    (docs/results.md: −57 points against SFT on the toy task's cold student; τ = 4 is within
    the seed spread of SFT in every regime there)."""
    offset: float = 0.0
    """DCOD b."""
    scale: float = 2.0
    """DCOD s (2: mean weight ≈ 1 when Δ ≈ 0)."""
    clip_min: float | None = None
    """Lower clip of the DCOD weight (None: no clip)."""
    clip_max: float | None = None
    """Upper clip of the DCOD weight (None: no clip)."""
    normalization: str = "tokens"
    """Loss denominator over the whole step: "tokens" (Σ m_t) or "weights" (Σ m_t w_t)."""
    topk_mode: str = "renormalize"
    """kl/todi over the teacher's stored top-k ids S: "renormalize" (the teacher's k probabilities
    renormalized to sum to 1, against the student's full-vocabulary probabilities of those ids) or
    "tail" (S plus one bucket holding each side's remaining mass)."""
    todi_beta: float = 1.0
    """ToDi β in α = σ(β log(p_T/q_θ))."""
    iw_sft_max_weight: float = 16.0
    """iw-SFT clamps its sequence weight to [0, this] (16 in arXiv 2507.12856)."""
    train_sources: tuple[str, ...] = SUPERVISED_SOURCES
    """Sources (the trace's `source` array: student, teacher, inserted) whose supervised tokens
    are trained; the others get loss mask 0, so they also leave the normalizer and every
    per-trace mean. Anything but all three needs the `source` array in every dataset."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("weighting", WEIGHTINGS),
            ("base_loss", BASE_LOSSES),
            ("scope", DCOD_SCOPES),
            ("normalization", NORMALIZATIONS),
            ("topk_mode", TOPK_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"dcod {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.temperature <= 0:
            raise ValueError(f"dcod temperature must be positive, got {self.temperature}")
        names = self.train_sources
        known = set(names) <= set(SUPERVISED_SOURCES)
        if not names or not known or len(set(names)) < len(names):
            raise ValueError(
                f"dcod train sources must be distinct names among {SUPERVISED_SOURCES}, got "
                f"{self.train_sources!r}"
            )

    @property
    def restricts_sources(self) -> bool:
        """Whether `train_sources` leaves a source out (the loss then reads `source`)."""
        return set(self.train_sources) != set(SUPERVISED_SOURCES)

    def required_arrays(self) -> tuple[str, ...]:
        """Trace-dataset arrays this correction reads, beyond tokens and loss mask."""
        needed = []
        if self.weighting == "dcod":
            needed.append("teacher_logprobs")
        if self.weighting == "iw_sft":
            needed.append("ref_logprobs")
        if self.base_loss in ("kl", "todi"):
            needed += ["teacher_topk_ids", "teacher_topk_logprobs"]
        if self.restricts_sources:
            needed.append("source")
        return tuple(needed)


@dataclass(frozen=True)
class TraceDataConfig:
    """How trace datasets become fixed-length training sequences."""

    seq_length: int
    """Tokens per training sequence (Megatron's --seq-length)."""
    pack: bool = True
    """Pack several traces per sequence (attention stays inside each trace); else one per row."""
    arrays: tuple[str, ...] = ()
    """Optional per-token arrays to load besides tokens and loss mask."""
    tokenizer: str | None = None
    """Tokenizer dir the run uses; every dataset's fingerprint must match it (None: no check)."""


@dataclass(frozen=True)
class ImportConfig:
    """`convert_checkpoint.py import-hf`."""

    hf_dir: Path
    """HF model dir: config.json and safetensors (one file or shards with an index)."""
    out: Path
    """Megatron checkpoint dir to create (passed to the trainer as --load)."""
    tensor_model_parallel_size: int = 1
    """TP of the training run (checked against heads; sets the vocabulary padding)."""
    pipeline_model_parallel_size: int = 1
    """PP of the training run (checked against layers)."""
    dtype: str | None = None
    """bf16 or fp32; default: bf16 unless the HF config's dtype is float32."""
    make_vocab_size_divisible_by: int = 128
    """Megatron's flag of the same name: the vocabulary is padded to a multiple of this × TP."""


@dataclass(frozen=True)
class ExportConfig:
    """`convert_checkpoint.py export-hf`."""

    ckpt: Path
    """Megatron --save dir (newest iteration) or one iteration/release dir."""
    hf_template: Path
    """HF dir with the student's config.json and tokenizer files (weights there are ignored)."""
    out: Path
    """HF model dir to create."""
    dtype: str | None = None
    """bf16, fp16 or fp32; default: the dtype the checkpoint stores."""
    max_shard_bytes: int = 5 * 10**9
    """Largest safetensors shard."""


@dataclass(frozen=True)
class EvalConfig:
    """tools/eval_math.py. Sampling fields left None take the benchmark's defaults
    (megatron_dcod/eval/benchmarks.py)."""

    model: Path | None
    """HF model dir (an exported student, a teacher, ...) with its tokenizer and chat template;
    None only with gold_vs_gold."""
    benchmark: str
    """A registry name (gsm8k, math500, aime24, ...) or `custom` (problem/answer records)."""
    data: str
    """JSONL / JSON / Parquet file, HF dataset dir, or HF hub dataset name."""
    out: Path
    """Output dir: generations.jsonl, summary.json, report.md, run_config.json."""
    split: str | None = None
    """Split of an HF dataset (default: the benchmark's, usually `test`)."""
    limit: int | None = None
    """Evaluate the first N problems only."""
    problem_field: str | None = None
    """Field holding the problem (default: the benchmark's)."""
    answer_field: str | None = None
    """Field holding the gold answer, taken as given (default: the benchmark's rule)."""
    system_prompt: str | None = None
    """System turn of the chat (None: no system turn)."""
    prompt_template: str = (
        "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    )
    """User turn; `{problem}` is replaced by the problem (str.format: write braces doubled)."""
    temperature: float | None = None
    """0: greedy."""
    top_p: float | None = None
    max_new_tokens: int | None = None
    """Also capped by the model's context length minus the prompt."""
    samples: int | None = None
    """k: responses per problem (pass@k, maj@k, avg@k)."""
    seed: int = 0
    backend: str = "auto"
    """auto (vLLM if installed and a GPU is present, else hf), hf or vllm."""
    device: str | None = None
    """Torch device of the HF backend (default: cuda if available, else cpu)."""
    dtype: str | None = None
    """fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)."""
    batch_size: int | None = None
    """Prompts per generate call (HF: the batch, default 16; vLLM: per chunk, default 1024).
    Results are written after each call, so this is also the resume granularity."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism."""
    grading_timeout: int = 5
    """Seconds math-verify may spend on one parse or comparison."""
    gold_vs_gold: bool = False
    """Grade each gold answer as the response (checks the data and grader; no model)."""


@dataclass(frozen=True)
class DriftConfig:
    """tools/measure_drift.py: ExAccErr (MiniLLM, arXiv 2306.08543, appendix B.5) of a student
    against its teacher; megatron_dcod/eval/drift.py holds the equations."""

    student: Path
    """HF model dir of the student q_θ (its tokenizer and chat template render the prompts)."""
    teacher: Path
    """HF model dir of the teacher p; same vocabulary as the student."""
    data: str
    """Prompts: a JSONL / JSON / Parquet file or HF dataset dir of `benchmark` records."""
    out: Path
    """Output dir: run_config.json, generations.jsonl, summary.json, report.md, drift.png."""
    benchmark: str = "custom"
    """Record format of `data`, as in tools/eval_math.py (custom: a `problem` field)."""
    split: str | None = None
    problem_field: str | None = None
    """Field holding the prompt text (default: the benchmark's)."""
    system_prompt: str | None = None
    prompt_template: str = EvalConfig.prompt_template
    """User turn; `{problem}` is replaced by the problem text."""
    num_prompts: int | None = 64
    """The first N prompts of `data` (None: all; the command line's 0)."""
    samples: int = 8
    """Responses sampled per prompt from each model."""
    max_new_tokens: int = 256
    """Longest generation l measured."""
    temperature: float = 1.0
    """Sampling temperature of both models (1: their own distributions, as eqs. 30–31 assume)."""
    top_p: float = 1.0
    seed: int = 0
    device: str | None = None
    """Torch device (default: cuda if available, else cpu)."""
    dtype: str = "fp32"
    """fp32, bf16 or fp16 weights; the divergences are computed in fp32."""
    batch_size: int = 8
    """Prompts per batch (each with `samples` responses); results are saved after each."""
    batch_tokens: int = 16384
    """Padded tokens per scoring forward pass (the logits of one pass are batch × vocab)."""
    report_lengths: tuple[int, ...] = ()
    """Lengths l the summary and report list (default: powers of two below max_new_tokens,
    and max_new_tokens)."""
