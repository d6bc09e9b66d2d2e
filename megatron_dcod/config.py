"""Configuration dataclasses. Built from CLI flags once (megatron_dcod/arguments.py), then passed
explicitly; library code never reads global arguments."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecordFields:
    """Names of the fields of an input record (DESIGN.md §4, "Input records")."""

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


@dataclass(frozen=True)
class ScoringConfig:
    """How to compute log-probs with an HF causal LM when the records carry none."""

    teacher_model: str | None = None
    """HF model dir that scores teacher log-probs (replaces any the records carry)."""
    ref_model: str | None = None
    """HF model dir of the initial student; its log-probs become `ref_logprobs` (iw-SFT)."""
    topk: int = 0
    """Also store the teacher's top-k ids and log-probs per token (0: none)."""
    device: str = "cpu"
    """Torch device of the scoring models ("cpu", "cuda", "cuda:1", ...)."""
    dtype: str = "fp32"
    """Weights dtype of the scoring models: "fp32" or "bf16" (log-softmax is always fp32)."""
    batch_tokens: int = 16384
    """Padded tokens per forward pass (batch size × longest trace in the batch)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """tools/preprocess_traces.py: teacher traces in, one trace dataset (DESIGN.md §4) out."""

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
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Teacher / reference scoring with HF models."""
