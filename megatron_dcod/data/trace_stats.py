"""The counts and statistics a trace dataset's meta.json holds, accumulated while writing.

`counts`: traces, tokens, supervised tokens. `stats`: the mean teacher log-prob over supervised
tokens, the largest token id and top-k id (what training checks against the model's
vocabulary without reading the arrays) and a length histogram.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from megatron_dcod.data.trace_format import Trace, TraceDataset


class TraceStats:
    """Counts and summary statistics accumulated while writing (stored in meta.json)."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.supervised_tokens = 0
        self.teacher_logprob_sum: float | None = None
        self.max_ids = {"tokens": -1, "teacher_topk_ids": -1}  # largest id of each id array

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
            },
            "stats": {
                "teacher_logprob_mean": mean_logprob,
                "max_token_id": self.max_ids["tokens"],
                "max_topk_id": self.max_ids["teacher_topk_ids"],
                "length_histogram": {"bin_starts": edges, "counts": counts.tolist()},
            },
        }
