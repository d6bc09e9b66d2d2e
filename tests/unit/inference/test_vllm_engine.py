"""The vLLM adapter against a stand-in `vllm` module (no vLLM on CPU) that answers as vLLM's
offline API does (RequestOutput, prompt_logprobs with None first and the actual token always
present, sample logprobs with ranks, stop strings, EOS kept in the ids), computed with plain
full forward passes of the tiny HF model: the adapter must agree with the HF engine."""

import importlib.machinery
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_dcod.inference.engine import SamplingConfig
from megatron_dcod.inference.hf_engine import HFEngine
from megatron_dcod.inference.vllm_engine import VLLMEngine

PROMPTS = ["Compute 12 + 7.", "What is 3 * 4? Be brief.", "Let us think", "Add 7"]


@dataclass
class Logprob:
    logprob: float
    rank: int


class StandInLLM:
    created: list = []

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        StandInLLM.created.append(self)

    def generate(self, inputs, params, use_tqdm):
        params = params if isinstance(params, list) else [params] * len(inputs)
        self.params = params
        return [self._one(item["prompt_token_ids"], p) for item, p in zip(inputs, params)]

    @torch.no_grad()
    def _logp(self, ids):
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)

    def _one(self, prompt, p):
        assert p.temperature == 0 or p.max_tokens == 1, "the stand-in decodes greedily"
        ids, finish, stop_reason, text = [], "length", None, ""
        while len(ids) < p.max_tokens:
            logp = self._logp(prompt + ids)
            ids.append(int(logp[-1].argmax()))
            if ids[-1] == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            hit = [s for s in (p.stop or []) if s in text]
            if hit:
                cut = min(text.index(s) + len(s) for s in hit)
                text = text[: cut if p.include_stop_str_in_output else cut - len(hit[0])]
                finish, stop_reason = "stop", hit[0]
                break
        completion = SimpleNamespace(
            text=self.tokenizer.decode(ids, skip_special_tokens=True) if stop_reason is None else text,
            token_ids=ids, finish_reason=finish, stop_reason=stop_reason, logprobs=None,
        )  # fmt: skip
        output = SimpleNamespace(outputs=[completion], prompt_logprobs=None)
        if p.prompt_logprobs is not None:
            logp = self._logp(prompt)
            output.prompt_logprobs = [None] + [
                self._entries(logp[i - 1], p.prompt_logprobs, prompt[i])
                for i in range(1, len(prompt))
            ]
        if p.logprobs:
            sampled = (int(self._logp(prompt)[-1].argmin()),)  # a sample outside the top-k
            completion.logprobs = [self._entries(self._logp(prompt)[-1], p.logprobs, *sampled)]
        return output

    @staticmethod
    def _entries(logp, k, actual):
        order = logp.argsort(descending=True).tolist()
        wanted = order[:k] + [actual]
        return {token: Logprob(float(logp[token]), order.index(token) + 1) for token in wanted}


@pytest.fixture
def stand_in(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = StandInLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(
        **{
            "stop": None,
            "include_stop_str_in_output": False,
            "prompt_logprobs": None,
            "logprobs": None,
        }
        | kwargs
    )
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.created = []
    return StandInLLM


@pytest.fixture(scope="module")
def prompt_ids(chat_tokenizer):
    return [chat_tokenizer.tokenizer(text)["input_ids"] for text in PROMPTS]


def test_generate_matches_the_hf_engine(stand_in, tiny_model_dir, chat_tokenizer, prompt_ids):
    hf = HFEngine(tiny_model_dir, chat_tokenizer.tokenizer)
    free = hf.generate(prompt_ids, SamplingConfig(0.0, 1.0, 12, 0), [0] * 4)
    stop = free[1].text[3:5]
    greedy = SamplingConfig(0.0, 1.0, 12, 0, stop=(stop,))
    vllm = VLLMEngine(tiny_model_dir, dtype="bf16", tensor_parallel_size=2, seed=1)
    on_vllm = vllm.generate(prompt_ids, greedy, seeds=[11, 12, 13, 14])
    on_hf = hf.generate(prompt_ids, greedy, [0] * 4)
    assert [(g.text, g.token_ids, g.finish_reason) for g in on_vllm] == [
        (g.text, g.token_ids, g.finish_reason) for g in on_hf
    ]
    assert {g.finish_reason for g in on_vllm} >= {"stop"}
    (llm,) = stand_in.created
    assert llm.kwargs == dict(
        dtype="bfloat16", tensor_parallel_size=2, seed=1, generation_config="vllm",
        enable_prefix_caching=True, max_logprobs=20,
    )  # fmt: skip
    assert [p.seed for p in llm.params] == [11, 12, 13, 14]
    assert llm.params[0].stop == [stop] and llm.params[0].include_stop_str_in_output


def test_eos_is_dropped_from_the_ids(stand_in, tiny_model_dir):
    vllm = VLLMEngine(tiny_model_dir, dtype="fp32")
    (llm,) = stand_in.created
    llm.tokenizer.eos_token_id = None  # nothing ends by EOS unless told
    first = vllm.generate([[3, 4, 5]], SamplingConfig(0.0, 1.0, 6, 0), [0])[0]
    llm.tokenizer.eos_token_id = first.token_ids[2]
    ended = vllm.generate([[3, 4, 5]], SamplingConfig(0.0, 1.0, 6, 0), [0])[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 6
    assert ended.finish_reason == "eos" and ended.token_ids == first.token_ids[:2]


def test_score_matches_the_hf_engine(stand_in, tiny_model_dir, chat_tokenizer, prompt_ids):
    requests = [
        (ids, prompt_ids[(i + 1) % 4][:n])
        for i, (ids, n) in enumerate(zip(prompt_ids, [3, 0, 5, 1]))
    ]
    on_hf = HFEngine(tiny_model_dir, chat_tokenizer.tokenizer).score(requests, topk=4)
    on_vllm = VLLMEngine(tiny_model_dir, dtype="fp32").score(requests, topk=4)
    for hf, vllm in zip(on_hf, on_vllm):
        assert vllm.error is None
        assert vllm.logprobs == pytest.approx(hf.logprobs, abs=1e-5)
        assert vllm.next_topk_ids == hf.next_topk_ids
        assert vllm.next_topk_logprobs == pytest.approx(hf.next_topk_logprobs, abs=1e-5)
    params = stand_in.created[0].params[0]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, -1, 1)
