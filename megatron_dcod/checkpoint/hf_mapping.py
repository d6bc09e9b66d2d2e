"""Name and layout mapping between HF checkpoints and Megatron's torch_dist checkpoints.

One declarative table per family (`FAMILIES`): each rule names a Megatron checkpoint key, the
HF tensors it is made of and how they are laid out (`Layout`). Keys under `decoder.layers.` are
stored by Megatron with the layer index as a leading axis; their HF names carry `{layer}`.
Megatron's checkpoint keys are the Transformer Engine names (the local layer spec maps its
norms onto them), so one table serves both specs.

Layouts (Megatron side first):
- `copy`: the same tensor.
- `vocab`: rows padded with zeros to Megatron's padded vocabulary on import, cut on export.
- `qkv`: one fused projection, grouped per query group g = 0..G-1 as
  [q heads of g (H/G · d rows); k of g (d rows); v of g (d rows)] (weights and biases).
- `gate_up`: the SwiGLU input projection `linear_fc1` = [gate; up] along the output rows.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from megatron_dcod.models.student import SUPPORTED_FAMILIES

LAYER_PREFIX = "decoder.layers."
"""Megatron keys under this prefix are stacked over layers (leading axis = layer index)."""
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some HF checkpoints store that are recomputed, never converted."""


class Layout(enum.Enum):
    COPY = "copy"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One Megatron checkpoint tensor and the HF tensors it is made of."""

    megatron: str
    """Megatron checkpoint key (per-layer keys start with `decoder.layers.`)."""
    hf: tuple[str, ...]
    """HF tensor names; `{layer}` stands for the layer index."""
    layout: Layout = Layout.COPY
    """How the HF tensors are arranged inside the Megatron tensor."""

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(name.format(layer=layer) for name in self.hf)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes the layouts need, from the HF config and Megatron's padded vocabulary."""

    heads: int
    query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @classmethod
    def of(cls, config: Any, padded_vocab_size: int) -> "Geometry":
        heads = config.num_attention_heads
        return cls(
            heads=heads,
            query_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            padded_vocab_size=padded_vocab_size,
        )


def _layer(megatron: str, *hf: str, layout: Layout = Layout.COPY) -> TensorRule:
    return TensorRule(
        LAYER_PREFIX + megatron, tuple(f"model.layers.{{layer}}.{n}" for n in hf), layout
    )


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Layout.VOCAB),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorRule("output_layer.weight", ("lm_head.weight",), Layout.VOCAB),  # untied only
    _layer("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    _layer("self_attention.linear_qkv.weight", *(f"{p}.weight" for p in _ATTENTION), layout=Layout.QKV),
    _layer("self_attention.linear_qkv.bias", *(f"{p}.bias" for p in _ATTENTION), layout=Layout.QKV),
    _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    _layer("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
    _layer("mlp.linear_fc1.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", layout=Layout.GATE_UP),
    _layer("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)  # fmt: skip
"""Llama layout. The qkv bias rule applies where the checkpoint has biases (Qwen2 always,
Llama/Mistral with `attention_bias`); rules apply to the keys a checkpoint has."""
_QK_NORM = (
    _layer("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    _layer("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
)

FAMILIES: dict[str, tuple[TensorRule, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA + _QK_NORM,
}
assert set(FAMILIES) == set(SUPPORTED_FAMILIES), "one table per supported family"


def rules_for(model_type: str) -> dict[str, TensorRule]:
    """The family's rules by Megatron key; ValueError listing the supported families."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"architecture {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    return {rule.megatron: rule for rule in FAMILIES[model_type]}


def hf_names(rules, layers: int) -> set[str]:
    """Every HF tensor name the rules make, over all layers."""
    layer_range = lambda rule: range(layers) if rule.per_layer else [None]  # noqa: E731
    return {name for rule in rules for i in layer_range(rule) for name in rule.hf_names(i)}


def to_megatron(rule: TensorRule, hf: list[torch.Tensor], geometry: Geometry) -> torch.Tensor:
    """The Megatron tensor (one layer's slice for per-layer keys) from the rule's HF tensors."""
    if rule.layout is Layout.COPY:
        return hf[0]
    if rule.layout is Layout.VOCAB:
        padding = geometry.padded_vocab_size - hf[0].shape[0]
        return torch.cat([hf[0], hf[0].new_zeros(padding, *hf[0].shape[1:])])
    if rule.layout is Layout.GATE_UP:
        return torch.cat(hf)
    groups = geometry.query_groups
    query, key, value = (t.reshape(groups, -1, *t.shape[1:]) for t in hf)  # [G, rows/G, ...]
    return torch.cat([query, key, value], dim=1).reshape(-1, *hf[0].shape[1:])


def to_hf(rule: TensorRule, megatron: torch.Tensor, geometry: Geometry) -> list[torch.Tensor]:
    """The rule's HF tensors from the Megatron tensor (inverse of `to_megatron`)."""
    if rule.layout is Layout.COPY:
        return [megatron]
    if rule.layout is Layout.VOCAB:
        return [megatron[: geometry.vocab_size]]
    if rule.layout is Layout.GATE_UP:
        return list(megatron.chunk(2))
    groups, head_dim = geometry.query_groups, geometry.head_dim
    per_group = megatron.reshape(groups, -1, *megatron.shape[1:])  # [G, (H/G + 2)·d, ...]
    query_rows = geometry.heads // groups * head_dim
    parts = per_group.split([query_rows, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *megatron.shape[1:]) for part in parts]
