"""Trace datasets as Megatron datasets: shuffled, packed fixed-length training sequences.

`TraceSequenceDataset` is a `MegatronDataset`, so Megatron's `BlendedMegatronDatasetBuilder`
gives `--data-path` blends (weights), `--split` train/valid/test splits and the blended index.
Each epoch shuffles the traces of its split with the run's seed, then packs them greedily in that
order into `seq_length`-token sequences (or one trace per sequence without packing). A trace of
T tokens gives T−1 (input, target) positions, shifted once per the format's alignment rule
(docs/data_format.md): input = tokens[:-1], label = tokens[1:], and every per-token array takes
the [1:] slice. Traces with more than `seq_length` positions are truncated (counted and logged).
Padding is 0 in every array: unsupervised, and source 0 (prompt) in the optional `source` array.
With `--data-cache-path`, the sample index (trace order and sequence starts) is cached there.

The arrays were validated when the dataset was written (finite log-probs, alignment); samples
are not checked again. Which arrays a run needs, and the tokenizer, are checked once before
training starts (`training/preflight.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset

from megatron_dcod.config import TraceDataConfig
from megatron_dcod.data.trace_format import ARRAY_SPECS, TraceDataset

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TraceBlendConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset-builder config plus how traces become sequences."""

    trace: TraceDataConfig | None = None
    """Packing and the optional arrays to load."""


def pack_greedily(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Start offsets of bins: consecutive items go in one bin until the next would overflow.

    lengths [n] (each ≤ capacity) → bin starts [n_bins + 1], the last entry being n.
    """
    if len(lengths) == 0:
        return np.zeros(1, dtype=np.int64)
    starts, used = [0], 0
    for index, length in enumerate(lengths.tolist()):
        if used + length > capacity:
            starts.append(index)
            used = 0
        used += length
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class TraceSequenceDataset(MegatronDataset):
    """Fixed-length training sequences of one trace dataset's split (see module doc)."""

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.trace_config: TraceDataConfig = config.trace
        self.seq_length = config.sequence_length
        self.order, self.bin_starts, self.truncated = self._cached_sample_index()
        logger.info(
            "%s (%s): %d traces → %d sequences of %d tokens, %d traces truncated",
            dataset_path, index_split.name, len(indices), len(self), self.seq_length,
            self.truncated,
        )  # fmt: skip

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: TraceDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: TraceBlendConfig) -> TraceDataset:
        return TraceDataset(dataset_path)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split"]

    def _cached_sample_index(self) -> tuple[np.ndarray, np.ndarray, int]:
        """`_build_sample_index`, read from / written to `config.path_to_cache` when set."""
        if not self.config.path_to_cache:
            return self._build_sample_index()
        identity = f"{self.unique_description}\npack={self.trace_config.pack}\n"
        identity += f"traces={len(self.dataset)} tokens={int(self.dataset.lengths.sum())}"
        key = hashlib.md5(identity.encode(), usedforsecurity=False).hexdigest()
        path = Path(self.config.path_to_cache, f"{key}-trace_sequence_index.npz")
        if path.is_file():
            cached = np.load(path)
            return cached["order"], cached["bin_starts"], int(cached["truncated"])
        order, bin_starts, truncated = self._build_sample_index()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.npz")
        np.savez(temporary, order=order, bin_starts=bin_starts, truncated=truncated)
        os.replace(temporary, path)  # ranks that build it at once write the same bytes
        return order, bin_starts, truncated

    def _build_sample_index(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(trace order over all epochs, bin start offsets into it, truncated-trace count)."""
        positions = self.dataset.lengths[self.indices].astype(np.int64) - 1  # [n] targets/trace
        truncated = int((positions > self.seq_length).sum())
        positions = np.minimum(positions, self.seq_length)
        generator = np.random.RandomState(self.config.random_seed)
        orders, starts, offset, samples = [], [np.zeros(1, np.int64)], 0, 0
        while True:  # whole epochs until there are num_samples sequences (one if None)
            permutation = generator.permutation(len(self.indices))  # one epoch
            if self.trace_config.pack:
                epoch_starts = pack_greedily(positions[permutation], self.seq_length)
            else:
                epoch_starts = np.arange(len(permutation) + 1, dtype=np.int64)
            orders.append(self.indices[permutation])
            starts.append(epoch_starts[1:] + offset)
            offset += len(permutation)
            samples += len(epoch_starts) - 1
            if self.num_samples is None or samples >= self.num_samples or offset == 0:
                break
        return np.concatenate(orders), np.concatenate(starts), truncated

    def __len__(self) -> int:
        return len(self.bin_starts) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """One training sequence: every array is [seq_length] (top-k arrays [seq_length, k])."""
        seq, k = self.seq_length, self.dataset.topk
        sample = {
            "tokens": np.zeros(seq, np.int64),
            "labels": np.zeros(seq, np.int64),
            "loss_mask": np.zeros(seq, np.float32),
            "position_ids": np.zeros(seq, np.int64),
        }
        for name in self.trace_config.arrays:
            spec = ARRAY_SPECS[name]
            sample[name] = np.zeros((seq, k) if spec.per_token == "topk" else seq, spec.dtype)
        trace_indices = self.order[self.bin_starts[index] : self.bin_starts[index + 1]]
        segment_ids = np.full(seq, len(trace_indices), np.int64)  # padding: a segment of its own
        used = 0
        for segment, trace_index in enumerate(trace_indices):
            trace = self.dataset[int(trace_index)]
            count = min(len(trace.tokens) - 1, seq)  # positions this trace contributes
            span = slice(used, used + count)
            sample["tokens"][span] = trace.tokens[:count]
            sample["labels"][span] = trace.tokens[1 : count + 1]
            sample["loss_mask"][span] = trace.loss_mask[1 : count + 1]
            sample["position_ids"][span] = np.arange(count)
            segment_ids[span] = segment
            for name in self.trace_config.arrays:
                sample[name][span] = getattr(trace, name)[1 : count + 1]
            used += count
        sample["segment_ids"] = segment_ids
        return sample
