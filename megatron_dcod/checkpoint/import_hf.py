"""HF safetensors → a Megatron torch_dist checkpoint the trainer starts fine-tuning from.

The checkpoint is Megatron's own: the student's sharded state dict (built on the meta device),
saved by `megatron.core.dist_checkpointing.save` as a `release` checkpoint (iteration 0, no
optimizer). Only the tensor writer differs: each tensor chunk is made from the HF tensors at the
moment torch.distributed.checkpoint writes it, so memory holds one layer's tensors, not the
model. The output appears under its final name only once complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from megatron_dcod.config import ImportConfig
from megatron_dcod.checkpoint.hf_files import HFCheckpointError, HFShardReader, expected_hf_shapes
from megatron_dcod.checkpoint.hf_mapping import (
    HF_IGNORED_SUFFIXES,
    Geometry,
    TensorRule,
    hf_names,
    rules_for,
    to_megatron,
)
from megatron_dcod.checkpoint.megatron_side import (
    RELEASE_DIR,
    TRACKER_FILE,
    check_parallel_layout,
    written_atomically,
    conversion_session,
    megatron_args,
    meta_student,
    single_process_group,
)

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
"""Megatron's sharded-state-dict metadata for the model part of a checkpoint."""


def default_dtype(hf_config) -> str:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return "fp32" if str(dtype).removeprefix("torch.") == "float32" else "bf16"


def import_hf(config: ImportConfig) -> Path:
    """Write the Megatron checkpoint; returns `config.out`."""
    from megatron_dcod.models.student import load_hf_config

    hf_config = load_hf_config(config.hf_dir)
    check_parallel_layout(
        hf_config, config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    )
    reader = HFShardReader(config.hf_dir)
    dtype = config.dtype or default_dtype(hf_config)
    flags = [
        f"--make-vocab-size-divisible-by={config.make_vocab_size_divisible_by}",
        f"--seq-length={hf_config.max_position_embeddings}",
    ]
    flags += ["--bf16"] if dtype == "bf16" else []
    with conversion_session():
        args = megatron_args(
            config.hf_dir,
            flags,
            config.tensor_model_parallel_size,
            config.pipeline_model_parallel_size,
        )
        with written_atomically(config.out) as partial:
            with single_process_group():
                _save(args, hf_config, reader, partial / RELEASE_DIR)
            (partial / TRACKER_FILE).write_text(RELEASE_DIR)
    return config.out


def _save(args, hf_config, reader: HFShardReader, directory: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import generate_state_dict
    from torch.distributed.checkpoint.api import CheckpointException

    model = meta_student(args, hf_config)
    state = generate_state_dict(
        args, [model], None, None, None, iteration=0,
        model_sd_kwargs=dict(metadata=dict(CONTENT_METADATA)),
    )  # fmt: skip
    state["num_floating_point_operations_so_far"] = 0
    shapes = _megatron_shapes(state)
    source = HFSource(reader, hf_config, args.padded_vocab_size, shapes)
    directory.mkdir(parents=True)
    with tqdm(total=_chunk_count(state), desc="import", unit="tensor") as progress:

        def chunk(*request):
            progress.update()
            return source.chunk(*request)

        try:
            dist_checkpointing.save(
                state,
                str(directory),
                sharded_strategy=_streaming_strategy(chunk),
                content_metadata=dict(CONTENT_METADATA),
            )
        except CheckpointException as error:  # the writer wraps what went wrong; raise that
            failures = [exception for exception, _ in error.failures.values()]
            raise (failures[0] if failures else error) from None


def _megatron_shapes(state) -> dict[str, tuple[int, ...]]:
    """Shape of each model tensor key at TP = 1: the whole tensor (one layer's, per layer)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {
        item.key: tuple(item.data.shape)
        for item in nested_values(state["model"])
        if isinstance(item, (ShardedTensor, ShardedTensorFactory))  # factory: SwiGLU fc1
    }


def _chunk_count(state) -> int:
    """Tensor chunks the save writes: one per layer and key, two for each SwiGLU fc1."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    kinds = [type(item) for item in nested_values(state["model"])]
    return kinds.count(ShardedTensor) + 2 * kinds.count(ShardedTensorFactory)


class HFSource:
    """Megatron tensor chunks made from HF tensors, one (key, layer) at a time."""

    def __init__(self, reader: HFShardReader, hf_config, padded_vocab: int, shapes: dict):
        self.reader, self.shapes = reader, shapes
        self.geometry = Geometry.of(hf_config, padded_vocab)
        self.hf_shapes = expected_hf_shapes(hf_config)
        family = rules_for(hf_config.model_type)
        unmapped = sorted(set(shapes) - set(family))
        if unmapped:
            raise ValueError(f"no {hf_config.model_type} rule for Megatron tensors {unmapped}")
        self.rules = {key: family[key] for key in shapes}
        self.layers = hf_config.num_hidden_layers
        self._check_names()
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def _check_names(self) -> None:
        needed = hf_names(self.rules.values(), self.layers)
        present = self.reader.names()
        missing = sorted(needed - present)
        extra = sorted(n for n in present - needed if not n.endswith(HF_IGNORED_SUFFIXES))
        if missing or extra:
            raise HFCheckpointError(
                f"{self.reader.directory}: tensors do not match the config's architecture; "
                f"missing {missing[:8]}, unexpected {extra[:8]}"
            )

    def tensor(self, key: str, layer: int | None) -> torch.Tensor:
        """The whole Megatron tensor of `key` (one layer's slice for per-layer keys)."""
        if self._cached is not None and self._cached[0] == (key, layer):
            return self._cached[1]
        rule: TensorRule = self.rules[key]
        names = rule.hf_names(layer)
        hf = self.reader.read(names)
        for name, tensor in zip(names, hf):
            if tuple(tensor.shape) != self.hf_shapes[name]:
                raise HFCheckpointError(
                    f"{self.reader.directory / self.reader.file_of[name]}: {name} has shape "
                    f"{tuple(tensor.shape)}, the config implies {self.hf_shapes[name]}"
                )
        result = to_megatron(rule, hf, self.geometry)
        assert tuple(result.shape) == self.shapes[key], (key, result.shape, self.shapes[key])
        self._cached = ((key, layer), result)
        return result

    def chunk(self, key: str, offsets: tuple, sizes: tuple, dtype: torch.dtype) -> torch.Tensor:
        """The chunk at `offsets` of `sizes` of Megatron's global tensor `key`."""
        per_layer = self.rules[key].per_layer
        whole = self.tensor(key, offsets[0] if per_layer else None)
        inner = zip(offsets[1:], sizes[1:]) if per_layer else zip(offsets, sizes)
        part = whole[tuple(slice(start, start + size) for start, size in inner)]
        return part.reshape(sizes).to(dtype).contiguous()


def _streaming_strategy(make_chunk: Callable):
    """Megatron's torch_dist save strategy, writing through torch's FileSystemWriter with tensor
    data made on demand (Megatron's async writer would stage every tensor first)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.planner import WriteItemType

    class OnDemandPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk, index = write_item.tensor_data.chunk, write_item.index
            dtype = write_item.tensor_data.properties.dtype
            return make_chunk(index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), dtype)

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            grouped: dict[str, list] = {}
            for item in nested_values(sharded_state_dict):
                key = item.unique_key if isinstance(item, ShardedObject) else item.key
                grouped.setdefault(key, []).append(item)
            save(
                mcore_to_pyt_state_dict(grouped, is_loading=False),
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=OnDemandPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            )

    return StreamingStrategy()
