"""The family tables and layouts against per-head reference loops."""

import pytest
import torch

from megatron_dcod.checkpoint.hf_mapping import (
    FAMILIES,
    Geometry,
    Layout,
    TensorRule,
    hf_names,
    rules_for,
    to_hf,
    to_megatron,
)

GEOMETRY = Geometry(heads=6, query_groups=2, head_dim=4, vocab_size=10, padded_vocab_size=16)


def reference_fused_qkv(query, key, value, geometry):
    """Megatron's fused order built row block by row block: per group, its query heads, then
    its key head, then its value head."""
    d, per_group = geometry.head_dim, geometry.heads // geometry.query_groups
    blocks = []
    for group in range(geometry.query_groups):
        for head in range(group * per_group, (group + 1) * per_group):
            blocks.append(query[head * d : (head + 1) * d])
        blocks.append(key[group * d : (group + 1) * d])
        blocks.append(value[group * d : (group + 1) * d])
    return torch.cat(blocks)


@pytest.mark.parametrize("trailing", [(8,), ()], ids=["weight", "bias"])
def test_qkv_matches_reference_and_inverts(trailing):
    g = GEOMETRY
    query = torch.randn(g.heads * g.head_dim, *trailing, dtype=torch.float64)
    key, value = (torch.randn(g.query_groups * g.head_dim, *trailing) for _ in range(2))
    rule = TensorRule("decoder.layers.x", ("q", "k", "v"), Layout.QKV)
    fused = to_megatron(rule, [query, key.double(), value.double()], g)
    assert torch.equal(fused, reference_fused_qkv(query, key.double(), value.double(), g))
    back = to_hf(rule, fused, g)
    assert all(torch.equal(a, b) for a, b in zip(back, [query, key.double(), value.double()]))


def test_gate_up_and_vocab_layouts():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    rule = TensorRule("decoder.layers.mlp", ("gate", "up"), Layout.GATE_UP)
    fused = to_megatron(rule, [gate, up], GEOMETRY)
    assert torch.equal(fused[:5], gate) and torch.equal(fused[5:], up)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, fused, GEOMETRY), [gate, up]))
    embedding = torch.randn(10, 3)
    vocab = TensorRule("embedding", ("e",), Layout.VOCAB)
    padded = to_megatron(vocab, [embedding], GEOMETRY)
    assert padded.shape == (16, 3) and torch.equal(padded[:10], embedding)
    assert not padded[10:].any()  # the padding rows Megatron adds
    assert torch.equal(to_hf(vocab, padded, GEOMETRY)[0], embedding)


def test_tables():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}
    for rules in FAMILIES.values():
        keys = [rule.megatron for rule in rules]
        assert len(keys) == len(set(keys))
        names = [name for rule in rules for name in rule.hf]
        assert len(names) == len(set(names))
    qwen3 = rules_for("qwen3")
    assert qwen3["decoder.layers.self_attention.q_layernorm.weight"].hf_names(3) == (
        "model.layers.3.self_attn.q_norm.weight",
    )
    made = hf_names([qwen3["decoder.final_layernorm.weight"]], layers=2)
    assert made == {"model.norm.weight"}


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: \['llama'"):
        rules_for("gpt2")
