"""A Megatron torch_dist checkpoint (any TP/PP/DP layout) → an HF model dir.

torch_dist stores global tensors, so the trainer's layout does not matter: each layer's tensors
are read back whole (Megatron's `dist_checkpointing.load` of that layer's slices), turned into
HF tensors by the family table and streamed into safetensors shards planned in advance, so
memory holds one layer. Config (dtype set), tokenizer files and generation config come from the
template; the output appears under its final name only once complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_dcod.checkpoint.hf_files import (
    copy_template,
    PlannedTensor,
    StreamingSafetensorsWriter,
    expected_hf_shapes,
    plan_shards,
    shard_file_names,
    write_index,
)
from megatron_dcod.checkpoint.hf_mapping import Geometry, TensorRule, hf_names, rules_for, to_hf
from megatron_dcod.checkpoint.megatron_side import (
    conversion_session,
    resolve_checkpoint_dir,
    single_process_group,
    written_atomically,
)
from megatron_dcod.config import ExportConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""Template files that are weights, never copied."""
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class MegatronCheckpoint:
    """Model tensors of a torch_dist checkpoint, read one layer at a time."""

    def __init__(self, directory: Path):
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = directory
        metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        self.tensors = {
            key: (tuple(item.size), item.properties.dtype)
            for key, item in metadata.items()
            if key.startswith(MODEL_KEY_PREFIXES) and hasattr(item, "size")
        }
        self.args = dist_checkpointing.load_common_state_dict(str(directory)).get("args")
        if self.args is None:
            raise ValueError(f"{directory}: checkpoint has no Megatron args")

    def read(self, keys: list[str], layer: int | None) -> dict[str, torch.Tensor]:
        """Whole tensors of `keys` (their slice `layer` for per-layer keys)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for key in keys:
            shape, dtype = self.tensors[key]
            local = shape if layer is None else (1, *shape[1:])  # one layer: [1, ...]
            offsets = [] if layer is None else [(0, layer, shape[0])]
            data = torch.empty(local, dtype=dtype)
            request[key] = ShardedTensor.from_rank_offsets(key, data, *offsets)
        loaded = dist_checkpointing.load(
            request, str(self.directory), validate_access_integrity=False
        )
        return {key: loaded[key] if layer is None else loaded[key][0] for key in keys}


def export_hf(config: ExportConfig) -> Path:
    """Write the HF model dir; returns `config.out`."""
    from megatron_dcod.models.student import load_hf_config

    hf_config = load_hf_config(config.hf_template)
    family = rules_for(hf_config.model_type)
    directory = resolve_checkpoint_dir(config.ckpt)
    with conversion_session(), written_atomically(config.out) as partial, single_process_group():
        checkpoint = MegatronCheckpoint(directory)
        shapes = _hf_shapes(hf_config)
        rules = _applicable_rules(checkpoint, family, hf_config, set(shapes))
        geometry = Geometry.of(hf_config, _padded_vocab(checkpoint, hf_config))
        stored = checkpoint.tensors["embedding.word_embeddings.weight"][1]
        dtype = DTYPES[config.dtype] if config.dtype else stored
        _write_tensors(checkpoint, rules, geometry, shapes, dtype, partial, config)
        copy_template(config.hf_template, partial, hf_config, dtype)
    return config.out


def _applicable_rules(checkpoint, family: dict, hf_config, needed: set) -> dict[str, TensorRule]:
    """The family rules whose keys the checkpoint has; they must make every HF tensor."""
    unknown = sorted(set(checkpoint.tensors) - set(family))
    if unknown:
        raise ValueError(
            f"{checkpoint.directory}: tensors {unknown} have no {hf_config.model_type} rule; "
            "is --hf-template the student's architecture?"
        )
    rules = {key: rule for key, rule in family.items() if key in checkpoint.tensors}
    made = hf_names(rules.values(), hf_config.num_hidden_layers)
    if made != needed:
        raise ValueError(
            f"{checkpoint.directory}: its tensors make HF tensors {sorted(made - needed)[:8]} "
            f"the template does not have and lack {sorted(needed - made)[:8]}"
        )
    args = checkpoint.args
    shape = (args.num_layers, args.hidden_size, args.num_attention_heads)
    expected = (
        hf_config.num_hidden_layers,
        hf_config.hidden_size,
        hf_config.num_attention_heads,
    )
    if shape != expected:
        raise ValueError(
            f"{checkpoint.directory}: (layers, hidden, heads) = {shape}, the template has {expected}"
        )
    return rules


def _hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """The HF tensors to write: the architecture's, without a tied head (saved as embedding)."""
    shapes = expected_hf_shapes(hf_config)
    if hf_config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _padded_vocab(checkpoint, hf_config) -> int:
    """Embedding rows; they must be the template's vocabulary padded as Megatron pads it."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    rows = checkpoint.tensors["embedding.word_embeddings.weight"][0][0]
    padded = vocab_size_with_padding(hf_config.vocab_size, checkpoint.args, logging_enabled=False)
    if rows != padded:
        raise ValueError(
            f"{checkpoint.directory}: {rows} embedding rows, but vocab_size "
            f"{hf_config.vocab_size} of {hf_config.name_or_path} padded as the trainer pads it "
            f"gives {padded}"
        )
    return rows


def _units(rules: dict, layers: int) -> list[tuple[int | None, list[TensorRule]]]:
    """Read units in file order: each layer's rules, then the rest (embedding, norm, head)."""
    per_layer = [rule for rule in rules.values() if rule.per_layer]
    other = [rule for rule in rules.values() if not rule.per_layer]
    return [(layer, per_layer) for layer in range(layers)] + [(None, other)]


def _write_tensors(checkpoint, rules, geometry, shapes, dtype, out: Path, config) -> None:
    from tqdm import tqdm

    units = _units(rules, checkpoint.args.num_layers)
    plan = [
        PlannedTensor(name, shapes[name], dtype)
        for layer, unit in units
        for rule in unit
        for name in rule.hf_names(layer)
    ]
    shards = plan_shards(plan, config.max_shard_bytes)
    files = shard_file_names(len(shards))
    writers = iter(StreamingSafetensorsWriter(out / f, s) for f, s in zip(files, shards))
    writer = next(writers)
    for layer, unit in tqdm(units, desc="export", unit="layer"):
        loaded = checkpoint.read([rule.megatron for rule in unit], layer)
        for rule in unit:
            for name, tensor in zip(
                rule.hf_names(layer), to_hf(rule, loaded[rule.megatron], geometry)
            ):
                if writer.done:
                    writer.close()
                    writer = next(writers)
                writer.write(name, tensor.to(dtype))
        del loaded
    writer.close()
    write_index(out, shards, files)
