"""The Megatron engine's datasets and sample order, for the DeepSpeed engine.

Trace datasets become training sequences through the same builder as in the Megatron engine
(`training/providers.build_datasets`: Megatron's blended dataset builder over
`TraceSequenceDataset`, so blending, splits, shuffling and packing are one implementation),
sized as Megatron sizes them, and are read in Megatron's order by Megatron's own sampler: step
i takes samples [i·G, (i+1)·G) of the blend, micro-batch j of rank r the slice at
(j·DP + r)·micro. Both engines therefore see the same sequences in the same steps.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron_dcod.engines.config import DataSourceConfig, ScheduleConfig

LEGACY_DEFAULT_SPLIT = "969, 30, 1"
"""Megatron's --split when --data-path is given without one."""


def blend_namespace(sources: DataSourceConfig) -> argparse.Namespace:
    """The attributes Megatron's `get_blend_and_blend_per_split` reads."""
    return argparse.Namespace(
        data_path=list(sources.data_path) or None,
        data_args_path=None,
        per_split_data_args_path=None,
        train_data_path=_list(sources.train_data_path),
        valid_data_path=_list(sources.valid_data_path),
        test_data_path=_list(sources.test_data_path),
    )


def _list(values):
    return list(values) if values else None


def split_of(sources: DataSourceConfig) -> str | None:
    if sources.split is None and sources.data_path:
        return LEGACY_DEFAULT_SPLIT
    return sources.split


def sample_counts(schedule: ScheduleConfig, global_batch: int) -> list[int]:
    """[train, valid, test] sequences to build, as Megatron counts them."""
    train = schedule.train_iters * global_batch
    interval = schedule.eval_interval
    evaluations = schedule.train_iters // interval + 1 if interval else 1
    return [
        train,
        evaluations * schedule.eval_iters * global_batch,
        schedule.eval_iters * global_batch,
    ]


def build_splits(sources: DataSourceConfig, data, schedule: ScheduleConfig, global_batch: int):
    """(train, valid, test) datasets (None where a split is empty), Megatron's builder."""
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_dcod.training.providers import build_datasets

    blend, blend_per_split = get_blend_and_blend_per_split(blend_namespace(sources))
    return build_datasets(
        sample_counts(schedule, global_batch),
        data=data,
        seed=schedule.seed,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split_of(sources),
        cache_dir=sources.data_cache_path,
    )


@dataclass(frozen=True)
class Layout:
    """Where this rank's micro-batches come from."""

    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int
    num_workers: int
    pin_memory: bool


def micro_batches(dataset, consumed_samples: int, layout: Layout) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from sample `consumed_samples` on (Megatron's sampler), as
    dicts of CPU tensors ([b, s], top-k [b, s, k]); endless: a split is read epoch after
    epoch (the builder sized it for the run, so that only happens if the run is extended)."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    while True:
        sampler = MegatronPretrainingSampler(
            total_samples=len(dataset),
            consumed_samples=consumed_samples % len(dataset),
            micro_batch_size=layout.micro_batch_size,
            data_parallel_rank=layout.data_parallel_rank,
            data_parallel_size=layout.data_parallel_size,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=layout.num_workers,
            pin_memory=layout.pin_memory,
            generator=torch.Generator().manual_seed(0),  # not a draw from the global RNG
        )
        yield from loader
        consumed_samples = 0
