"""Dataset provider and the checks that must fail before step 1 (DESIGN.md §5)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from megatron_dcod.config import TraceDataConfig
from megatron_dcod.data.trace_format import (
    TokenizerFingerprint,
    TraceFormatError,
    check_tokenizer,
    read_meta,
)

logger = logging.getLogger(__name__)


def blend_prefixes(data_path: list[str] | None) -> list[str]:
    """The dataset prefixes of Megatron's `--data-path [weight] prefix ...` list."""
    if not data_path:
        raise ValueError("--data-path is required: one or more trace dataset prefixes")
    if len(data_path) == 1:
        return list(data_path)
    return [entry for entry in data_path if not _is_number(entry)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def preflight(
    prefixes: list[str], data: TraceDataConfig, model_vocab_size: int
) -> tuple[TraceDataConfig, TokenizerFingerprint]:
    """Check every dataset against the run before any step; returns the data config to use.

    Refuses: a missing array the correction needs, datasets tokenized differently from each
    other or from `--dcod-tokenizer`, token ids the model's vocabulary cannot hold.
    """
    metas = {prefix: read_meta(prefix) for prefix in prefixes}
    reference = (
        tokenizer_fingerprint(data.tokenizer)
        if data.tokenizer
        else TokenizerFingerprint(**metas[prefixes[0]]["tokenizer"])
    )
    for prefix, meta in metas.items():
        missing = [name for name in data.arrays if name not in meta["arrays"]]
        if missing:
            raise TraceFormatError(
                f"{prefix}: the correction needs {missing}, which this trace dataset lacks "
                f"(it has {meta['arrays']})"
            )
        check_tokenizer(meta, reference, prefix)
        if meta["tokenizer"]["vocab_size"] > model_vocab_size:
            raise TraceFormatError(
                f"{prefix}: tokenizer vocabulary of {meta['tokenizer']['vocab_size']} does not "
                f"fit the student's vocab_size {model_vocab_size} (--hf-config)"
            )
    diagnostics = ("teacher_logprobs",) if all(
        "teacher_logprobs" in meta["arrays"] for meta in metas.values()
    ) else ()  # fmt: skip
    arrays = tuple(dict.fromkeys(data.arrays + diagnostics))  # mean Δ needs teacher log-probs
    return replace(data, arrays=arrays), reference


def tokenizer_fingerprint(tokenizer_dir: str) -> TokenizerFingerprint:
    """Fingerprint of a local HF tokenizer dir, as preprocessing computes it."""
    from megatron_dcod.data.chat import ChatTokenizer

    return ChatTokenizer(tokenizer_dir).fingerprint


def build_datasets(
    num_samples: list[int],
    *,
    data: TraceDataConfig,
    tokenizer: TokenizerFingerprint,
    seed: int,
    blend: Any,
    blend_per_split: Any,
    split: str | None,
) -> tuple[Any, Any, Any]:
    """train, valid, test datasets through Megatron's blended dataset builder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_dcod.data.trace_dataset import TraceBlendConfig, TraceSequenceDataset

    config = TraceBlendConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        trace=data,
        expected_tokenizer=tokenizer,
    )
    builder = BlendedMegatronDatasetBuilder(TraceSequenceDataset, num_samples, lambda: True, config)
    return builder.build()
