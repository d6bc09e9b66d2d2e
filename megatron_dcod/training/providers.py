"""Megatron's extension points for the student: model, dataset and forward-step providers.

Each is built from Megatron's validated arguments and the `TrainingRun` the entry resolved
once (`training/preflight.py`), and passed to `megatron.training.pretrain`.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from megatron_dcod.training.preflight import TrainingRun
from megatron_dcod.training.step import ForwardStep, WeightSumNormalizer


def model_provider(
    args: argparse.Namespace, run: TrainingRun, weight_sum: WeightSumNormalizer | None = None
):
    """The HF-config student, one pipeline (or virtual) stage per call. With `weight_sum` (the
    `weights` normalization) its finalize function replaces Megatron's token count by the
    step's Σ m·w: `pretrain` keeps a finalize hook the model builder installs."""
    from megatron_dcod.models.student import student_from_args

    def provide(
        pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None
    ):
        model = student_from_args(
            args, run.hf_config, run.use_transformer_engine,
            pre_process, post_process, vp_stage, pg_collection,
        )  # fmt: skip
        if weight_sum is not None:
            model.config.finalize_model_grads_func = weight_sum.finalize
        return model

    return provide


def dataset_provider(args: argparse.Namespace, run: TrainingRun):
    """Blended, split trace sequences; every rank reads its own batches (`is_distributed`:
    Megatron's TP broadcast of a batch only carries a fixed set of keys)."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    provide = partial(
        build_datasets,
        data=run.data,
        seed=args.seed,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        cache_dir=args.data_cache_path,
    )
    provide.is_distributed = True
    return provide


def build_datasets(
    num_samples: list[int],
    *,
    data,
    seed: int,
    blend: Any,
    blend_per_split: Any,
    split: str | None,
    cache_dir: str | None,
) -> tuple[Any, Any, Any]:
    """train, valid, test datasets through Megatron's blended dataset builder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_dcod.data.sequences import TraceBlendConfig, TraceSequenceDataset

    config = TraceBlendConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache_dir,
        trace=data,
    )
    builder = BlendedMegatronDatasetBuilder(TraceSequenceDataset, num_samples, lambda: True, config)
    return builder.build()


def forward_step(
    args: argparse.Namespace, run: TrainingRun, weight_sum: WeightSumNormalizer | None = None
) -> ForwardStep:
    """The ForwardStep, its weight metrics wired to Megatron's logging state."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    from megatron_dcod.training.metrics import WeightMetrics

    metrics = WeightMetrics(
        log_interval=args.log_interval,
        num_microbatches=get_num_microbatches,
        next_iteration=lambda: args.curr_iteration + 1,  # Megatron updates it every step
        writers=lambda: (get_tensorboard_writer(), get_wandb_writer()),
        data_parallel_group=lambda: parallel_state.get_data_parallel_group(
            with_context_parallel=True
        ),
        is_reporting_rank=args.rank == args.world_size - 1,
        per_source="source" in run.data.arrays,
    )
    return ForwardStep(
        correction=run.correction, pack=run.data.pack, metrics=metrics, weight_sum=weight_sum
    )
