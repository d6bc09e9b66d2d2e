"""Trace datasets as Megatron datasets: shuffled, packed fixed-length training sequences.

`TraceSequenceDataset` is a `MegatronDataset`, so Megatron's `BlendedMegatronDatasetBuilder`
gives `--data-path` blends (weights), `--split` train/valid/test splits and the blended index.
Each epoch shuffles the traces of its split with the run's seed, then packs them greedily in that
order into `seq_length`-token sequences (or one trace per sequence without packing). A trace of
T tokens gives T−1 (input, target) positions, shifted once per the alignment rule of DESIGN.md
§4: input = tokens[:-1], label = tokens[1:], and every per-token array takes the [1:] slice.
Traces with more than `seq_length` positions are truncated (counted and logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_dcod.config import TraceDataConfig
from megatron_dcod.data.trace_format import TraceDataset, TraceFormatError, TokenizerFingerprint

logger = logging.getLogger(__name__)

SCALAR_FLOAT_ARRAYS = ("teacher_logprobs", "ref_logprobs")
TOPK_ARRAYS = ("teacher_topk_ids", "teacher_topk_logprobs")


@dataclass(kw_only=True)
class TraceBlendConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset-builder config plus how traces become sequences."""

    trace: TraceDataConfig | None = None
    """Packing, optional arrays and the expected tokenizer."""
    expected_tokenizer: TokenizerFingerprint | None = None
    """Every dataset must carry this tokenizer fingerprint (None: they must agree among
    themselves, checked by the dataset provider)."""


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
        self.order, self.bin_starts, self.truncated = self._build_sample_index()
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
        dataset = TraceDataset(dataset_path, tokenizer=config.expected_tokenizer)
        missing = [name for name in config.trace.arrays if not dataset.has(name)]
        if missing:
            raise TraceFormatError(
                f"{dataset_path}: the run needs {missing}, which this trace dataset lacks "
                f"(it has {sorted(dataset.meta['arrays'])})"
            )
        return dataset

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split"]

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
            shape = (seq, k) if name in TOPK_ARRAYS else (seq,)
            sample[name] = np.zeros(shape, np.int64 if name.endswith("ids") else np.float32)
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
                values = getattr(trace, name)[1 : count + 1]
                if name.endswith("logprobs") and not np.isfinite(values).all():
                    raise TraceFormatError(
                        f"{self.dataset_path}: trace {int(trace_index)} has non-finite {name}"
                    )
                sample[name][span] = values
            used += count
        sample["segment_ids"] = segment_ids
        return sample
