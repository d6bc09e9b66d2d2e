"""The scoring model: this rank's pipeline stage of the student architecture (the trainer's
model builder, `models/student.py`), its weights read from a torch_dist checkpoint at any
TP/PP layout (torch_dist stores global tensors; each rank reads its slices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_dcod.scoring.config import ScoreConfig

DTYPE_FLAGS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}


def saved_arguments(checkpoint_dir: Path) -> Any:
    """The Megatron arguments a checkpoint was written with (its common state)."""
    from megatron.core import dist_checkpointing

    args = dist_checkpointing.load_common_state_dict(str(checkpoint_dir)).get("args")
    if args is None:
        raise ValueError(f"{checkpoint_dir}: the checkpoint holds no Megatron arguments")
    return args


def check_architecture(saved: Any, hf_config: Any, checkpoint_dir: Path, hf_dir: str) -> None:
    """The checkpoint must be of the --hf-config architecture."""
    shape = (saved.num_layers, saved.hidden_size, saved.num_attention_heads, saved.vocab_size)
    expected = (
        hf_config.num_hidden_layers,
        hf_config.hidden_size,
        hf_config.num_attention_heads,
        hf_config.vocab_size,
    )
    if shape != expected:
        raise ValueError(
            f"--load {checkpoint_dir}: (layers, hidden, heads, vocab_size) = {shape}, but "
            f"--hf-config {hf_dir} has {expected}"
        )


def load_stage(config: ScoreConfig, hf_config: Any, checkpoint_dir: Path, cpu: bool):
    """This rank's stage in eval mode, on the device, weights in `config.dtype`.

    Needs Megatron's model-parallel state at the config's TP/PP."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_dcod.checkpoint.megatron_side import megatron_args
    from megatron_dcod.models.student import student_from_args, transformer_engine_available

    saved = saved_arguments(checkpoint_dir)
    check_architecture(saved, hf_config, checkpoint_dir, config.hf_config)
    flags = [
        f"--seq-length={config.seq_length}",
        f"--make-vocab-size-divisible-by={saved.make_vocab_size_divisible_by}",
        *DTYPE_FLAGS[config.dtype],
    ]
    args = megatron_args(
        Path(config.hf_config),
        flags,
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        cpu=cpu,
    )
    use_te = transformer_engine_available() and args.transformer_impl == "transformer_engine"
    model = student_from_args(
        args,
        hf_config,
        use_te,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        perform_initialization=False,
    )
    if not cpu:
        model.cuda(torch.cuda.current_device())
    sharded, absent = _without_absent_extra_state(model.sharded_state_dict(), checkpoint_dir)
    loaded = dist_checkpointing.load({"model": sharded}, str(checkpoint_dir))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    if set(missing) != absent or unexpected:
        raise ValueError(
            f"--load {checkpoint_dir}: the model's weights {sorted(set(missing) - absent)[:8]} "
            f"are not in the checkpoint; it has {sorted(unexpected)[:8]} the model does not"
        )
    return model.eval()


def _without_absent_extra_state(sharded: dict, checkpoint_dir: Path) -> tuple[dict, set[str]]:
    """The model's sharded state dict without the `_extra_state` entries the checkpoint does not
    hold, and their names. Transformer Engine modules keep FP8 metadata there; a checkpoint
    written without TE (`import-hf` on a CPU) has none for them, and no scoring needs it."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # ShardedObjects are stored under "{key}/shard_{offsets}_{shape}"; their key is the prefix
    stored = {key.split("/shard_")[0] for key in load_sharded_metadata(str(checkpoint_dir))}
    absent = {
        name
        for name, item in sharded.items()
        if name.endswith("_extra_state") and getattr(item, "key", None) not in stored
    }
    return {name: item for name, item in sharded.items() if name not in absent}, absent
