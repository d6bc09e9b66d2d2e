"""Configuration of the Megatron scorer (`python -m megatron_dcod.score`), built once from the
command line (`scoring/arguments.py`) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("teacher", "ref")
"""What the scoring model is: the teacher (`teacher_logprobs`, optional top-k) or the frozen
initial student of iw-SFT (`ref_logprobs`)."""


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run: a checkpoint, its parallel layout, and the datasets it adds arrays to."""

    data_path: tuple[str, ...]
    """Trace dataset prefixes (tools/preprocess_traces.py output), scored one after the other."""
    hf_config: str
    """The scoring model's HF dir: its config.json gives the architecture (as the trainer's
    `--hf-config`), its tokenizer is checked against each dataset's."""
    load: str
    """Megatron torch_dist checkpoint of the scoring model (`convert_checkpoint.py import-hf`, or
    a training `--save` dir): Megatron's tracker file or an iteration / release dir."""
    seq_length: int
    """Tokens per packed row; every trace must fit in one row."""
    role: str = "teacher"
    """`--as`: "teacher" writes `teacher_logprobs` (+ top-k), "ref" writes `ref_logprobs`."""
    topk: int = 0
    """Also write the teacher's top-k ids and log-probs per token (0: none; teacher only)."""
    tokenizer: str | None = None
    """The scoring model's tokenizer dir, if not in `hf_config`."""
    tensor_model_parallel_size: int = 1
    """TP: the vocabulary and attention heads are split over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: the layers are split over this many stages."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch (one forward pass of `micro_batch_size × seq_length` tokens)."""
    pipeline_microbatches: int | None = None
    """Micro-batches per pipeline schedule call (None: 1 without PP, 4 × PP with it, so the
    pipeline's fill and drain cost little)."""
    dtype: str = "fp32"
    """Weights and activations: "fp32", "bf16" (`--bf16`) or "fp16" (`--fp16`); the
    log-softmax is fp32 whatever this is."""
    shard_traces: int = 1024
    """Traces per resumable shard: a rerun after a kill skips finished shards. Shards are dealt
    to the data-parallel ranks in turn."""
    logits_chunk_tokens: int = 4096
    """Tokens per fp32 log-softmax chunk: bounds the fp32 copy of the (TP-local) logits."""
    overwrite: bool = False
    """Replace arrays the dataset already has (else such a dataset is refused)."""
    seed: int = 1234
    """Megatron's RNG seed (the forward draws nothing; kept for Megatron's RNG tracker)."""

    @property
    def arrays(self) -> tuple[str, ...]:
        """The dataset arrays this run writes."""
        if self.role == "ref":
            return ("ref_logprobs",)
        topk = ("teacher_topk_ids", "teacher_topk_logprobs") if self.topk else ()
        return ("teacher_logprobs", *topk)

    @property
    def replaced_arrays(self) -> tuple[str, ...]:
        """The arrays this run writes or makes stale: a teacher run without top-k removes a
        top-k of another model."""
        if self.role == "ref":
            return ("ref_logprobs",)
        return ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")

    def microbatches(self) -> int:
        if self.pipeline_microbatches is not None:
            return self.pipeline_microbatches
        return (
            1 if self.pipeline_model_parallel_size == 1 else 4 * self.pipeline_model_parallel_size
        )
