"""Tiny trace datasets written straight in the on-disk format, and HF configs for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter

FINGERPRINT = {
    "name_or_path": "synthetic",
    "vocab_size": 64,
    "vocab_sha256": "0" * 64,
    "chat_template_sha256": None,
}
TOPK = 3


def synthetic_trace(
    rng: np.random.Generator, vocab: int, length: int, topk: int, sources: bool = False
) -> Trace:
    """A learnable trace: a 2-token prompt (start a, step b) then a, a+b, a+2b, ... mod vocab.

    Teacher log-probs are high on the response (the rule is easy) with some noise; the top-k
    holds the true next token first. With `sources`, the response is student-written up to its
    middle token, which is inserted, then teacher-written (no random draw: the same traces).
    """
    start, step = rng.integers(2, vocab), rng.integers(1, 5)
    response = (start + step * np.arange(length - 2)) % vocab
    tokens = np.concatenate([[start, step], response]).astype(np.int32)  # [T]
    loss_mask = np.zeros(length, np.uint8)
    loss_mask[2:] = 1
    teacher = (-rng.exponential(0.3, length) * loss_mask).astype(np.float32)
    topk_ids = np.stack([(tokens + shift) % vocab for shift in range(topk)], axis=1)  # [T, k]
    topk_logprobs = np.log(np.array([0.7, 0.2, 0.05][:topk]))[None].repeat(length, 0)
    source = None
    if sources:
        middle = (length + 2) // 2
        source = np.zeros(length, np.uint8)  # [T] 0 prompt, 1 student, 3 inserted, 2 teacher
        source[2:middle], source[middle], source[middle + 1 :] = 1, 3, 2
    return Trace(
        tokens=tokens,
        loss_mask=loss_mask,
        teacher_logprobs=teacher,
        teacher_topk_ids=(topk_ids * loss_mask[:, None]).astype(np.int32),
        teacher_topk_logprobs=(topk_logprobs * loss_mask[:, None]).astype(np.float16),
        ref_logprobs=(teacher - 0.5 * loss_mask).astype(np.float32),
        source=source,
    )


def write_synthetic_traces(
    prefix: Path,
    count: int = 64,
    vocab: int = 64,
    seed: int = 0,
    lengths=(4, 24),
    sources: bool = False,
    fingerprint: dict | None = None,
) -> Path:
    """`count` synthetic traces of lengths in [lengths[0], lengths[1]) at `prefix` (with the
    `source` array if `sources`), stamped with `fingerprint` (default: a synthetic tokenizer
    of `vocab` ids)."""
    rng = np.random.default_rng(seed)
    arrays = ("tokens", "loss_mask", "teacher_logprobs", "teacher_topk_ids")
    arrays += ("teacher_topk_logprobs", "ref_logprobs") + (("source",) if sources else ())
    with TraceDatasetWriter(prefix, arrays, topk=TOPK) as writer:
        for _ in range(count):
            length = int(rng.integers(*lengths))
            writer.add(synthetic_trace(rng, vocab, length, TOPK, sources))
        writer.commit({"tokenizer": fingerprint or dict(FINGERPRINT, vocab_size=vocab)})
    return prefix


def save_hf_config(directory: Path, family: str = "llama", vocab: int = 64, **overrides) -> Path:
    """config.json of a tiny student of an HF family (no weights)."""
    from transformers import AutoConfig

    settings = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    AutoConfig.for_model(family, **settings).save_pretrained(directory)
    return Path(directory)
