"""Inference engines on a GPU: the HF engine on CUDA against CPU, and vLLM where installed."""

import importlib.util
import shutil

import pytest
import torch

from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer
from megatron_dcod.inference.engine import SamplingConfig
from megatron_dcod.inference.hf_engine import HFEngine
from megatron_dcod.inference.vllm_engine import VLLMEngine
from tests.helpers.models import save_tiny_llama
from tests.unit.conftest import TOKENIZER_TEXTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
PROMPTS = ["Compute 12 + 7.", "What is 3 * 4? Be brief.", "Let us think", "Add 7"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer_dir = train_tiny_tokenizer(TOKENIZER_TEXTS, tmp_path_factory.mktemp("tok"), 320)
    chat = ChatTokenizer(tokenizer_dir)
    directory = tmp_path_factory.mktemp("model")
    save_tiny_llama(directory, len(chat.tokenizer), seed=3, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    prompts = [chat.tokenizer(text)["input_ids"] for text in PROMPTS]
    return directory, chat.tokenizer, prompts


def _generate(model, device, dtype):
    directory, tokenizer, prompts = model
    backend = HFEngine(directory, tokenizer, device=device, dtype=dtype, batch_size=4)
    return backend.generate(prompts, GREEDY, seeds=[0] * len(prompts))


def test_cuda_fp32_greedy_equals_cpu(model):
    on_cpu, on_gpu = _generate(model, "cpu", "fp32"), _generate(model, "cuda", "fp32")
    assert [g.token_ids for g in on_gpu] == [g.token_ids for g in on_cpu]


def test_cuda_bf16_generates_the_same_first_tokens(model):
    on_cpu, on_gpu = _generate(model, "cpu", "fp32"), _generate(model, "cuda", "bf16")
    assert all(len(g.token_ids) == 16 and g.error is None for g in on_gpu)
    assert [g.token_ids[:2] for g in on_gpu] == [g.token_ids[:2] for g in on_cpu]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_greedy_equals_hf(model):
    directory, _, prompts = model
    on_hf = _generate(model, "cuda", "fp32")
    backend = VLLMEngine(directory, dtype="fp32", tensor_parallel_size=1, seed=0)
    on_vllm = backend.generate(prompts, GREEDY, seeds=[0] * len(prompts))
    assert [g.token_ids[:4] for g in on_vllm] == [g.token_ids[:4] for g in on_hf]


def test_cuda_scores_equal_cpu(model):
    directory, tokenizer, prompts = model
    requests = [(ids, prompts[(i + 1) % len(prompts)][:3]) for i, ids in enumerate(prompts)]
    on_cpu = HFEngine(directory, tokenizer, device="cpu", dtype="fp32").score(requests, topk=5)
    on_gpu = HFEngine(directory, tokenizer, device="cuda", dtype="fp32").score(requests, topk=5)
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.logprobs == pytest.approx(cpu.logprobs, abs=1e-4)
        assert gpu.next_topk_ids == cpu.next_topk_ids


def test_cuda_sampling_is_per_sequence(model):
    directory, tokenizer, prompts = model
    engine = HFEngine(directory, tokenizer, device="cuda", dtype="fp32", batch_size=4)
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=0)
    batched = engine.generate(prompts, sampled, [5, 6, 7, 8])
    alone = [engine.generate([ids], sampled, [seed])[0] for ids, seed in zip(prompts, [5, 6, 7, 8])]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
