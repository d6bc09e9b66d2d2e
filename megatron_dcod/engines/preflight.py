"""What the DeepSpeed engine checks before step 1, and its dry run for the Slurm script.

`prepare` refuses, before DeepSpeed starts: a model dir without a readable config or a
tokenizer, a sequence length its sliding window would cut, and datasets that are damaged, lack
an array the correction needs, were tokenized with another tokenizer than the model's, or hold
ids beyond its vocabulary (the Megatron engine's dataset checks, `training/preflight.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from megatron_dcod.config import TraceDataConfig
from megatron_dcod.engines.config import HFTrainConfig
from megatron_dcod.engines.data import blend_namespace
from megatron_dcod.engines.deepspeed_setup import batch_geometry, deepspeed_config


@dataclass(frozen=True)
class HFRun:
    """What `prepare` resolves once for the run."""

    hf_config: Any
    """The student's HF config."""
    data: TraceDataConfig
    """The trace data config with the tokenizer and the diagnostic arrays to load."""


def check_model_flags(config: HFTrainConfig) -> Any:
    """The HF config, checked against --seq-length; what the dry run checks too."""
    from megatron_dcod.models.student import check_sequence_length, load_hf_config

    hf_config = load_hf_config(config.hf_model, flag="--hf-model", any_family=True)
    check_sequence_length(hf_config, config.data.seq_length)
    check_architecture(hf_config, config.hf_model)
    return hf_config


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def check_architecture(hf_config: Any, model_dir: str) -> None:
    """Refuse what the engine would train or export wrongly: mixture-of-experts models (their
    router's auxiliary loss is not part of the corrected loss) and families that transformers
    loads through a weight conversion (fused experts, renamed prefixes), which the streaming HF
    export, writing the names and layout held in memory, does not invert."""
    experts = max(int(getattr(hf_config, name, 0) or 0) for name in EXPERT_COUNTS)
    if experts > 1:
        raise ValueError(
            f"--hf-model {model_dir}: a mixture-of-experts model ({experts} experts) is not "
            "supported (the router's auxiliary loss is not part of the corrected loss)"
        )
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers before 5: no load-time weight conversions
        return
    if get_checkpoint_conversion_mapping(hf_config.model_type) is not None:
        raise ValueError(
            f"--hf-model {model_dir}: {hf_config.model_type} weights are converted as they "
            "load (transformers' checkpoint conversion mapping), which the engine's HF export "
            "does not invert; this family is not supported"
        )


def prepare(config: HFTrainConfig) -> HFRun:
    """Every check of the module doc; raises ValueError naming what is wrong."""
    from megatron_dcod.data.chat import ChatTokenizer
    from megatron_dcod.training.preflight import check_datasets, dataset_prefixes

    hf_config = check_model_flags(config)
    tokenizer_dir = config.data.tokenizer or config.hf_model
    try:
        ChatTokenizer(tokenizer_dir)
    except Exception as error:
        raise ValueError(
            f"{tokenizer_dir}: no usable tokenizer ({error}); the engine checks every dataset "
            "against the model's tokenizer (or --dcod-tokenizer) and copies it into HF exports"
        ) from error
    data = replace(config.data, tokenizer=tokenizer_dir)
    prefixes = dataset_prefixes(blend_namespace(config.sources))
    data, _ = check_datasets(prefixes, data, hf_config.vocab_size)
    return HFRun(hf_config=hf_config, data=data)


def dry_run(config: HFTrainConfig, world_size: int) -> str:
    """Check the flags for `world_size` processes without data, devices or process group:
    batch geometry, the model's config, the DeepSpeed config (with --deepspeed-config)."""
    check_model_flags(config)
    global_batch, accumulation = batch_geometry(config.schedule, world_size)
    micro = config.schedule.micro_batch_size
    deepspeed_config(config.deepspeed, config.optimizer, micro, accumulation, world_size)
    options = config.deepspeed
    return (
        f"flags OK for {world_size} processes: ZeRO-{options.zero_stage} over DP {world_size}; "
        f"global batch {global_batch} = micro {micro} × DP {world_size} × {accumulation} "
        f"accumulation steps; seq length {config.data.seq_length}; "
        f"{'bf16' if options.bf16 else 'fp32'}; weighting {config.correction.weighting}"
    )


def write_resolved_config(
    config: HFTrainConfig, run: HFRun, ds_config: dict, world_size: int
) -> Path | None:
    """`{--save}/dcod_config.json`: the run's dataclasses, DeepSpeed config and HF config."""
    if not config.checkpoint.save:
        return None
    import deepspeed
    import transformers

    resolved = {
        "engine": "deepspeed",
        "config": asdict(config),
        "data": asdict(run.data),
        "deepspeed_config": ds_config,
        "world_size": world_size,
        "hf_config": run.hf_config.to_dict(),
        "versions": {"deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
    }
    from megatron_dcod.training.preflight import write_resolved

    return write_resolved(config.checkpoint.save, resolved)
