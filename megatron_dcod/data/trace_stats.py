"""The counts and statistics a trace dataset's meta.json holds, accumulated while writing.

`counts`: traces, tokens, supervised tokens (and, with the `source` array, supervised tokens by
source). `stats`: the mean teacher log-prob over supervised tokens, the largest token id and
top-k id (what training checks against the model's vocabulary without reading the arrays) and a
length histogram.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_dcod.data.sources import SOURCE_NAMES, SUPERVISED_SOURCES

if TYPE_CHECKING:
    from megatron_dcod.data.trace_format import Trace, TraceDataset


class TraceStats:
    """Counts and summary statistics accumulated while writing (stored in meta.json)."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.supervised_tokens = 0
        self.teacher_logprob_sum: float | None = None
        self.max_ids = {"tokens": -1, "teacher_topk_ids": -1}  # largest id of each id array
        self.source_tokens: np.ndarray | None = None  # [len(SOURCE_NAMES)] supervised per code

    def add(self, trace: Trace) -> None:
        self.lengths.append(len(trace.tokens))
        self.supervised_tokens += int(trace.loss_mask.sum())
        for name in self.max_ids:
            if getattr(trace, name) is not None:
                self.max_ids[name] = max(self.max_ids[name], int(getattr(trace, name).max()))
        if trace.teacher_logprobs is not None:
            supervised = trace.loss_mask.astype(bool)
            logprob_sum = float(trace.teacher_logprobs[supervised].sum(dtype=np.float64))
            self.teacher_logprob_sum = (self.teacher_logprob_sum or 0.0) + logprob_sum
        if trace.source is not None:
            self._add_sources(trace.source[trace.loss_mask.astype(bool)])

    def _add_sources(self, supervised_sources: np.ndarray) -> None:
        counts = np.bincount(supervised_sources, minlength=len(SOURCE_NAMES))  # [codes]
        previous = 0 if self.source_tokens is None else self.source_tokens
        self.source_tokens = previous + counts.astype(np.int64)

    def add_dataset(self, dataset: TraceDataset) -> None:
        self.lengths.extend(dataset.lengths.tolist())
        for name in self.max_ids:
            if dataset.has(name):
                self.max_ids[name] = max(self.max_ids[name], dataset.max_id(name))
        supervised = dataset.meta["counts"]["supervised_tokens"]
        self.supervised_tokens += supervised
        mean_logprob = dataset.meta["stats"]["teacher_logprob_mean"]
        if mean_logprob is not None:
            self.teacher_logprob_sum = (self.teacher_logprob_sum or 0.0) + mean_logprob * supervised
        if dataset.has("source"):
            self._add_dataset_sources(dataset)

    def _add_dataset_sources(self, dataset: TraceDataset) -> None:
        """The counts by source of meta.json, else (an older dataset) of a scan of the arrays."""
        by_source = dataset.meta["counts"].get("supervised_tokens_by_source")
        if by_source is None:
            supervised = dataset.flat("loss_mask").astype(bool)  # [total tokens]
            self._add_sources(np.asarray(dataset.flat("source")[supervised]))
            return
        counts = np.zeros(len(SOURCE_NAMES), np.int64)  # [codes]
        for code, name in SOURCE_NAMES.items():
            counts[code] = by_source.get(name, 0)
        self.source_tokens = counts + (0 if self.source_tokens is None else self.source_tokens)

    def summary(self) -> dict[str, Any]:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        longest = max(int(lengths.max(initial=0)), 16)
        edges = [0] + [2**p for p in range(4, longest.bit_length() + 1)]  # 0, 16, 32, ...
        counts, _ = np.histogram(lengths, bins=edges + [np.iinfo(np.int64).max])
        mean_logprob = None
        if self.teacher_logprob_sum is not None:
            mean_logprob = self.teacher_logprob_sum / max(self.supervised_tokens, 1)
        return {
            "counts": {
                "traces": len(lengths),
                "tokens": int(lengths.sum()),
                "supervised_tokens": self.supervised_tokens,
                **self._by_source(),
            },
            "stats": {
                "teacher_logprob_mean": mean_logprob,
                "max_token_id": self.max_ids["tokens"],
                "max_topk_id": self.max_ids["teacher_topk_ids"],
                "length_histogram": {"bin_starts": edges, "counts": counts.tolist()},
            },
        }

    def _by_source(self) -> dict[str, Any]:
        """{"supervised_tokens_by_source": {student: n, teacher: n, inserted: n}} or {}."""
        if self.source_tokens is None:
            return {}
        codes = {name: code for code, name in SOURCE_NAMES.items()}
        counts = {name: int(self.source_tokens[codes[name]]) for name in SUPERVISED_SOURCES}
        return {"supervised_tokens_by_source": counts}
