"""Per-token arrays added to an existing trace dataset (the Megatron scorer's output).

The new arrays are written under temporary names beside the prefix and renamed into place only
when complete; meta.json is rewritten last (atomically), so a reader sees the dataset either
without the arrays or with all of them. Arrays being replaced are first dropped from meta.json,
so that no state in between pairs an array with another model's statistics. The dataset's other
files are not touched. Layout and names: `trace_format.py`.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from megatron_dcod.data.trace_format import (
    ARRAY_SPECS,
    TraceDataset,
    TraceFormatError,
    array_path_prefix,
    indexed_dataset_module,
    meta_path,
    read_meta,
)

TEACHER_TOPK = ("teacher_topk_ids", "teacher_topk_logprobs")


def write_meta(prefix: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Replace `{prefix}.meta.json` atomically (a temporary file renamed over it)."""
    path = meta_path(prefix)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temp, path)


class ArrayAdder:
    """Writes new arrays for every trace of a dataset, in trace order; `commit` puts them in.

    Use as a context manager: leaving the block without `commit` deletes what was written."""

    def __init__(self, prefix: str | os.PathLike, arrays: tuple[str, ...], topk: int = 0):
        self.prefix = Path(prefix)
        self.lengths = TraceDataset(prefix).lengths  # [n] tokens per trace
        self._starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])  # [n+1]
        self.arrays, self.topk = arrays, topk
        self.traces_added = 0
        self._temp = self.prefix.parent / f".{self.prefix.name}.partial-{uuid.uuid4().hex}"
        builder = indexed_dataset_module().IndexedDatasetBuilder
        self._builders = {
            name: builder(self._file(self._temp, name, ".bin"), ARRAY_SPECS[name].storage_dtype)
            for name in arrays
        }
        self._teacher_logprob_sum = 0.0
        self._max_topk_id = -1

    @staticmethod
    def _file(prefix: Path, name: str, suffix: str) -> str:
        return array_path_prefix(prefix, name) + suffix

    def __enter__(self) -> "ArrayAdder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._builders:
            self.abort()

    def add(self, values: dict[str, np.ndarray], traces: int) -> None:
        """The values of the next `traces` traces: per array, their values concatenated
        ([tokens] or [tokens, k])."""
        first = self.traces_added
        if first + traces > len(self.lengths):
            raise TraceFormatError(f"{self.prefix}: more than {len(self.lengths)} traces added")
        lengths = self.lengths[first : first + traces]
        tokens = int(self._starts[first + traces] - self._starts[first])
        for name, builder in self._builders.items():
            spec = ARRAY_SPECS[name]
            array = values[name]
            if spec.dtype is np.float16:  # below its range is −inf: clamp (p = 0), as the writer
                array = np.maximum(array, np.finfo(np.float16).min)
            array = np.ascontiguousarray(array, spec.dtype)
            width = self.topk if spec.per_token == "topk" else 1
            expected = (tokens, width) if spec.per_token == "topk" else (tokens,)
            if array.shape != expected:
                raise TraceFormatError(f"{name}: shape {array.shape}, expected {expected}")
            stored = array.reshape(-1).view(spec.storage_dtype)
            builder.add_document(stored, (lengths * width).tolist())
        self._update_stats(values)
        self.traces_added += traces

    def _update_stats(self, values: dict[str, np.ndarray]) -> None:
        if "teacher_logprobs" in values:  # 0 on unsupervised tokens: the sum is the masked sum
            self._teacher_logprob_sum += float(values["teacher_logprobs"].sum(dtype=np.float64))
        if "teacher_topk_ids" in values and values["teacher_topk_ids"].size:
            self._max_topk_id = max(self._max_topk_id, int(values["teacher_topk_ids"].max()))

    def commit(self, meta_update: dict[str, Any], remove: tuple[str, ...] = ()) -> dict[str, Any]:
        """Finish the arrays, rename them in (replacing same-named ones, deleting `remove`),
        and write meta.json with `meta_update` merged in; returns the new meta.json."""
        if self.traces_added != len(self.lengths):
            raise TraceFormatError(
                f"{self.prefix}: values for {self.traces_added} of {len(self.lengths)} traces"
            )
        for name, builder in self._builders.items():
            builder.finalize(self._file(self._temp, name, ".idx"))
        self._builders = {}
        meta = read_meta(self.prefix)
        stale = [name for name in meta["arrays"] if name in set(self.arrays) | set(remove)]
        if stale:  # first the dataset without them: valid whatever happens next
            write_meta(self.prefix, self._updated(meta, drop=stale, add=()))
        for name in remove:
            for suffix in (".bin", ".idx"):
                Path(self._file(self.prefix, name, suffix)).unlink(missing_ok=True)
        for name in self.arrays:
            for suffix in (".idx", ".bin"):
                os.replace(
                    self._file(self._temp, name, suffix), self._file(self.prefix, name, suffix)
                )
        final = self._updated(meta, drop=stale, add=self.arrays) | meta_update
        write_meta(self.prefix, final)
        TraceDataset(self.prefix)  # every array's index and size against the tokens
        return final

    def _updated(self, meta: dict, drop: list[str], add: tuple[str, ...]) -> dict[str, Any]:
        """meta.json with the arrays `drop` removed and `add` present, and their statistics."""
        present = (set(meta["arrays"]) - set(drop)) | set(add)
        updated = dict(meta, arrays=[name for name in ARRAY_SPECS if name in present])
        stats = dict(meta["stats"])
        if "teacher_logprobs" in drop:
            stats["teacher_logprob_mean"] = None
        if "teacher_logprobs" in add:
            supervised = max(meta["counts"]["supervised_tokens"], 1)
            stats["teacher_logprob_mean"] = self._teacher_logprob_sum / supervised
        if not set(TEACHER_TOPK) <= present:
            stats["max_topk_id"], updated["topk"] = -1, 0
        if set(TEACHER_TOPK) & set(add):
            stats["max_topk_id"], updated["topk"] = self._max_topk_id, self.topk
        updated["stats"] = stats
        return updated

    def abort(self) -> None:
        """Delete everything this adder wrote."""
        for builder in self._builders.values():
            builder.data_file.close()
        self._builders = {}
        for name in self.arrays:
            for suffix in (".bin", ".idx"):
                Path(self._file(self._temp, name, suffix)).unlink(missing_ok=True)
