"""Generation backends: the batched HF backend against plain unbatched HF generate, its per-item
failures, and the vLLM adapter against a stand-in `vllm` module (no vLLM on CPU)."""

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.eval import generation
from megatron_dcod.eval.generation import Generation, HFBackend, SamplingConfig, VLLMBackend

GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
PROMPTS = ["Compute 12 + 7.", "What is 3 * 4? Be brief.", "Let us think", "Add 7"]


@pytest.fixture(scope="module")
def prompt_ids(chat_tokenizer):
    return [chat_tokenizer.tokenizer(text)["input_ids"] for text in PROMPTS]


def test_batched_left_padded_greedy_equals_unbatched_hf_generate(
    tiny_model_dir, chat_tokenizer, prompt_ids
):
    backend = HFBackend(
        tiny_model_dir, chat_tokenizer.tokenizer, device="cpu", dtype="fp32", batch_size=4
    )
    untouched = backend.generate(prompt_ids, GREEDY, seeds=[0] * 4)
    assert all(result.truncated and len(result.token_ids) == 12 for result in untouched)
    backend.stop_ids = backend.stop_ids | {untouched[0].token_ids[5]}  # a stop token it emits
    batched = backend.generate(prompt_ids, GREEDY, seeds=[0] * 4)
    assert not batched[0].truncated and len(batched[0].token_ids) <= 5
    reference = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32
    ).eval()
    stop = backend.stop_ids
    for ids, result in zip(prompt_ids, batched):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(stop)
            )[0, len(ids) :].tolist()
        expected = out[: next((j for j, t in enumerate(out) if t in stop), len(out))]
        assert result.token_ids == expected
        assert result.text == chat_tokenizer.tokenizer.decode(expected, skip_special_tokens=True)
        assert result.truncated == (len(expected) == 12)


def test_sampling_is_seeded(tiny_model_dir, chat_tokenizer, prompt_ids):
    backend = HFBackend(
        tiny_model_dir, chat_tokenizer.tokenizer, device="cpu", dtype="fp32", batch_size=2
    )
    sampled = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=0)
    first = backend.generate(prompt_ids, sampled, seeds=[5, 6, 7, 8])
    again = backend.generate(prompt_ids, sampled, seeds=[5, 6, 7, 8])
    other = backend.generate(prompt_ids, sampled, seeds=[9, 10, 11, 12])
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_failures_stay_with_their_item(tiny_model_dir, chat_tokenizer, prompt_ids, monkeypatch):
    backend = HFBackend(
        tiny_model_dir, chat_tokenizer.tokenizer, device="cpu", dtype="fp32", batch_size=4
    )
    too_long = [5] * 300  # the model's context is 256 positions
    poisoned = prompt_ids[1]
    real_generate = backend.model.generate

    def generate(input_ids, **kwargs):
        if any(row[-len(poisoned) :].tolist() == poisoned for row in input_ids):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(backend.model, "generate", generate)
    results = backend.generate([prompt_ids[0], poisoned, too_long, prompt_ids[2]], GREEDY, [0] * 4)
    assert results[1].error.startswith("generation failed: RuntimeError('CUDA out of memory")
    assert "prompt of 300 tokens fills the model's context (256)" in results[2].error
    assert results[0].error is None and results[0].token_ids
    assert results[3].error is None and results[3].token_ids


def _fake_vllm(monkeypatch, completions):
    """A stand-in `vllm` module recording what the adapter asks of it."""
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, inputs, params, use_tqdm):
            calls["inputs"], calls["params"] = inputs, params
            return [SimpleNamespace(outputs=[completion]) for completion in completions]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = LLM
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_vllm_adapter(monkeypatch, tmp_path):
    completions = [
        SimpleNamespace(text="a b", token_ids=[4, 5, 2], finish_reason="stop", stop_reason=None),
        SimpleNamespace(
            text="c d e", token_ids=[6, 7, 8], finish_reason="length", stop_reason=None
        ),
    ]
    calls = _fake_vllm(monkeypatch, completions)
    backend = VLLMBackend(tmp_path, dtype="bf16", tensor_parallel_size=2, seed=1)
    sampled = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=64, seed=1)
    results = backend.generate([[1, 2, 3], [4]], sampled, seeds=[11, 12])
    assert results == [Generation("a b", [4, 5], False), Generation("c d e", [6, 7, 8], True)]
    assert calls["init"]["dtype"] == "bfloat16" and calls["init"]["tensor_parallel_size"] == 2
    assert calls["init"]["generation_config"] == "vllm"
    assert calls["inputs"] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert [p["seed"] for p in calls["params"]] == [11, 12]
    assert calls["params"][0] | {"seed": 0} == dict(
        n=1, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=64, seed=0
    )


def test_backend_choice(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    assert generation.choose_backend("auto") == "hf"
    with pytest.raises(ValueError, match="vLLM is not installed"):
        generation.choose_backend("vllm")
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generation.choose_backend("auto") == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert generation.choose_backend("auto") == "vllm"
    assert generation.choose_backend("hf") == "hf"
