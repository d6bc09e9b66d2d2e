"""The student architecture from an HF `config.json` (Llama, Qwen2, Qwen3, Mistral families).

`--hf-config DIR` is turned into Megatron's own architecture flags (`--num-layers`,
`--swiglu`, `--rotary-base`, ...) before Megatron parses its arguments, so every Megatron
component (checkpoint args, FLOPs accounting, converters) sees one consistent description; the
vocabulary is the HF `vocab_size`, padded as Megatron pads it (`--make-vocab-size-divisible-by`
× TP). The layer spec is Transformer Engine's when TE is installed (required for FP8), else the
local spec with packed-sequence attention (CPU mode).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
QKV_BIAS_FAMILIES = ("qwen2",)  # q, k, v projections carry a bias
QK_NORM_FAMILIES = ("qwen3",)  # RMSNorm on each head's query and key


def load_hf_config(
    config_dir: str | Path, flag: str = "--hf-config", any_family: bool = False
) -> Any:
    """`AutoConfig` from a local dir holding an HF `config.json`; ValueError naming `flag` and
    the dir. Unless `any_family` (the DeepSpeed engine), only the families the Megatron
    student maps."""
    from transformers import AutoConfig

    if not Path(config_dir, "config.json").is_file():
        raise ValueError(f"{flag} {config_dir}: no config.json there")
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except Exception as error:  # transformers raises several types for a bad config
        raise ValueError(f"{flag} {config_dir}: cannot read config.json: {error}") from error
    if not any_family and config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"--hf-config {config_dir}: model_type {config.model_type!r} is not one of "
            f"{SUPPORTED_FAMILIES}"
        )
    return config


def rope_theta(config: Any) -> float:
    """RoPE base of the config; refuses RoPE scaling schemes the student does not implement."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    parameters = parameters or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (plain RoPE only)")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def megatron_architecture_flags(config: Any) -> list[str]:
    """Megatron flags that describe the HF architecture `config`."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    flags = [
        f"--num-layers={config.num_hidden_layers}",
        f"--hidden-size={config.hidden_size}",
        f"--ffn-hidden-size={config.intermediate_size}",
        f"--num-attention-heads={heads}",
        f"--kv-channels={head_dim}",
        f"--max-position-embeddings={config.max_position_embeddings}",
        f"--vocab-size={config.vocab_size}",
        "--tokenizer-type=NullTokenizer",
        "--normalization=RMSNorm",
        f"--norm-epsilon={config.rms_norm_eps}",
        "--swiglu",
        "--disable-bias-linear",
        "--position-embedding-type=rope",
        f"--rotary-base={int(rope_theta(config))}",  # Megatron takes an integer θ
        f"--init-method-std={config.initializer_range}",
        f"--attention-dropout={getattr(config, 'attention_dropout', 0.0)}",
        "--hidden-dropout=0.0",
    ]
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        flags += ["--group-query-attention", f"--num-query-groups={kv_heads}"]
    if config.hidden_act != "silu":
        raise ValueError(f"activation {config.hidden_act!r} is not supported (SwiGLU/silu only)")
    if config.model_type in QKV_BIAS_FAMILIES or getattr(config, "attention_bias", False):
        flags.append("--add-qkv-bias")
    if config.model_type in QK_NORM_FAMILIES:
        flags.append("--qk-layernorm")
    if not config.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def check_sequence_length(config: Any, seq_length: int) -> None:
    """Sliding-window attention is not implemented: refuse sequences the window would cut."""
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if window and uses_window and seq_length > window:
        raise ValueError(
            f"--seq-length {seq_length} exceeds the config's sliding window {window}; "
            "sliding-window attention is not supported"
        )


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(qk_layernorm: bool, use_transformer_engine: bool):
    """Megatron's TE layer spec, or the local one with packed-sequence attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron_dcod.models.packed_attention import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=qk_layernorm, normalization="RMSNorm"
    )
    attention = spec.submodules.self_attention
    attention.submodules = dataclasses.replace(
        attention.submodules, core_attention=PackedDotProductAttention
    )
    return spec


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """What the model provider needs beyond Megatron's TransformerConfig."""

    padded_vocab_size: int
    """Embedding rows: the HF vocab padded as Megatron pads it."""
    max_sequence_length: int
    """Longest sequence the position encoding is built for."""
    tie_embeddings: bool
    """Share the input embedding with the output layer."""
    rotary_base: float
    """RoPE θ."""
    use_transformer_engine: bool
    """TE layer spec (and FP8 capability) instead of the local spec."""


def build_student(
    spec: StudentSpec,
    transformer_config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
):
    """One pipeline stage (or virtual stage) of the GPT student."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_spec(
            transformer_config.qk_layernorm, spec.use_transformer_engine
        ),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def student_from_args(
    args,
    hf_config,
    use_transformer_engine: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    **config_overrides,
):
    """The student built from Megatron's validated arguments (the trainer's model provider and
    the checkpoint converters); `config_overrides` replace TransformerConfig fields."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    spec = StudentSpec(
        padded_vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        rotary_base=rope_theta(hf_config),
        use_transformer_engine=use_transformer_engine,
    )
    config = dataclasses.replace(core_transformer_config_from_args(args), **config_overrides)
    return build_student(spec, config, pre_process, post_process, vp_stage, pg_collection)
