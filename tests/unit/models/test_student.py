"""HF config → Megatron architecture flags, per family."""

import pytest

from megatron_dcod.models.student import (
    check_sequence_length,
    load_hf_config,
    megatron_architecture_flags,
)
from tests.helpers.traces import save_hf_config


def flags_of(tmp_path, family, **overrides):
    return megatron_architecture_flags(
        load_hf_config(save_hf_config(tmp_path, family, **overrides))
    )


def test_llama_flags(tmp_path):
    flags = flags_of(tmp_path, "llama", rope_theta=500000.0, rms_norm_eps=1e-5)
    for flag in (
        "--num-layers=2", "--hidden-size=32", "--ffn-hidden-size=64", "--num-attention-heads=4",
        "--kv-channels=8", "--group-query-attention", "--num-query-groups=2", "--vocab-size=64",
        "--normalization=RMSNorm", "--norm-epsilon=1e-05", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type=rope", "--rotary-base=500000",
        "--untie-embeddings-and-output-weights",
    ):  # fmt: skip
        assert flag in flags, flag
    assert "--add-qkv-bias" not in flags and "--qk-layernorm" not in flags


def test_family_specifics(tmp_path):
    assert "--add-qkv-bias" in flags_of(tmp_path / "q2", "qwen2")
    qwen3 = flags_of(tmp_path / "q3", "qwen3", head_dim=16)
    assert "--qk-layernorm" in qwen3 and "--kv-channels=16" in qwen3
    tied = flags_of(tmp_path / "tied", "mistral", tie_word_embeddings=True)
    assert "--untie-embeddings-and-output-weights" not in tied
    mha = flags_of(tmp_path / "mha", "llama", num_key_value_heads=4)
    assert "--group-query-attention" not in mha


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one of"):
        load_hf_config(save_hf_config(tmp_path / "gpt2", "gpt2", n_layer=1))
    scaled = save_hf_config(
        tmp_path / "yarn", "llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}
    )
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        megatron_architecture_flags(load_hf_config(scaled))
    mistral = load_hf_config(save_hf_config(tmp_path / "mistral", "mistral", sliding_window=16))
    check_sequence_length(mistral, 16)
    with pytest.raises(ValueError, match="sliding window 16"):
        check_sequence_length(mistral, 32)
