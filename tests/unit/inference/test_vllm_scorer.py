"""The vLLM trace scorer against a stand-in `vllm` module (no vLLM on CPU) that answers as
vLLM's offline API does: RequestOutput.prompt_logprobs with None first, then per prompt token
{id: Logprob} holding the top-k with ranks 1..k plus the actual token when outside it, computed
with full float64 forward passes of the tiny HF model. The scorer must agree with the HF one."""

import argparse
import dataclasses
import importlib.machinery
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.arguments import add_preprocess_args, preprocess_config_from_args
from megatron_dcod.data.preprocess import preprocess_traces
from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.inference.trace_scorer import CausalLMScorer
from megatron_dcod.inference.vllm_scorer import VLLMTraceScorer
from tests.helpers.models import save_tiny_llama

from ..conftest import PROBLEMS, write_jsonl

VOCAB = 96
TOPK = 3


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclasses.dataclass
class EngineArgs:
    """What the scorer inspects to tell whether this vLLM has `logprobs_mode`."""

    model: str = ""
    logprobs_mode: str = "raw_logprobs"


@dataclasses.dataclass
class OldEngineArgs:
    model: str = ""


class StandInLLM:
    created: list = []

    def __init__(self, model, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=256))
        StandInLLM.created.append(self)

    def generate(self, prompts, params, use_tqdm):
        assert not use_tqdm and params.max_tokens == 1
        assert params.prompt_logprobs <= self.kwargs["max_logprobs"]
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        return [self._one(p["prompt_token_ids"], params.prompt_logprobs) for p in prompts]

    @torch.no_grad()
    def _one(self, prompt, k):
        logp = torch.log_softmax(self.model(torch.tensor([prompt])).logits[0], -1)  # [T, V]
        entries = [None]
        for i in range(1, len(prompt)):
            order = logp[i - 1].argsort(descending=True).tolist()
            rank = (logp[i - 1] > logp[i - 1, prompt[i]]).sum().item() + 1
            actual = {prompt[i]: Logprob(logp[i - 1, prompt[i]].item(), rank)}  # listed first
            top = {t: Logprob(logp[i - 1, t].item(), r + 1) for r, t in enumerate(order[:k])}
            entries.append(actual | top)
        return SimpleNamespace(prompt_token_ids=prompt, prompt_logprobs=entries, outputs=[])


@pytest.fixture
def stand_in(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.EngineArgs = StandInLLM, EngineArgs
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.created = []
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), VOCAB, seed=4)


def make_traces():
    """Lengths 0, 1, 2, 7, 30, 64 with random masks (element 0 never supervised)."""
    rng = np.random.default_rng(1)
    traces = []
    for length in (0, 1, 2, 7, 30, 64):
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        mask = (rng.random(length) < 0.7).astype(np.uint8)
        traces.append((tokens, mask))
    return traces


def test_matches_the_hf_scorer(stand_in, model_dir):
    traces = make_traces()
    on_hf = CausalLMScorer(model_dir, topk=TOPK).score(traces)
    scorer = VLLMTraceScorer(model_dir, dtype="fp32", topk=TOPK, batch_tokens=40)
    on_vllm = scorer.score(traces)
    for (tokens, mask), hf, vllm in zip(traces, on_hf, on_vllm):
        assert vllm.logprobs.dtype == np.float32 and vllm.logprobs.shape == tokens.shape
        np.testing.assert_allclose(vllm.logprobs, hf.logprobs, rtol=0, atol=1e-5)
        assert vllm.topk_ids.dtype == np.int32 and vllm.topk_logprobs.dtype == np.float16
        np.testing.assert_array_equal(vllm.topk_ids, hf.topk_ids)
        np.testing.assert_allclose(vllm.topk_logprobs, hf.topk_logprobs, rtol=2e-3, atol=2e-3)
        assert not vllm.logprobs[: min(1, len(tokens))].any() and not vllm.logprobs[mask == 0].any()
    (llm,) = StandInLLM.created
    assert llm.kwargs == dict(
        dtype="float32", tensor_parallel_size=1, enable_prefix_caching=False,
        max_logprobs=TOPK, generation_config="vllm", logprobs_mode="raw_logprobs",
    )  # fmt: skip
    params = llm.calls[0][1]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, -1, 1)
    assert params.prompt_logprobs == TOPK
    sent = [[len(prompt) for prompt in prompts] for prompts, _ in llm.calls]
    assert sent == [[1, 2, 7, 30], [64]]  # at most 40 tokens a call, one trace at least; no 0


def test_reference_scoring_and_older_vllm(stand_in, model_dir):
    """topk 0 still asks for one prompt log-prob; a vLLM without `logprobs_mode` is not
    passed it (the default there, at temperature 1, is the raw distribution too)."""
    stand_in.EngineArgs = OldEngineArgs
    traces = make_traces()[1:]
    scored = VLLMTraceScorer(model_dir, dtype="bf16").score(traces)
    on_hf = CausalLMScorer(model_dir).score(traces)
    for vllm, hf in zip(scored, on_hf):
        assert vllm.topk_ids is None and vllm.topk_logprobs is None
        np.testing.assert_allclose(vllm.logprobs, hf.logprobs, rtol=0, atol=1e-5)
    (llm,) = StandInLLM.created
    assert "logprobs_mode" not in llm.kwargs and llm.kwargs["dtype"] == "bfloat16"
    assert llm.kwargs["max_logprobs"] == 1 and llm.calls[0][1].prompt_logprobs == 1


def test_refusals(stand_in, model_dir):
    with pytest.raises(ValueError, match="must share the vocabulary"):
        VLLMTraceScorer(model_dir, min_vocab_size=VOCAB + 1)
    scorer = VLLMTraceScorer(model_dir)
    too_long = np.zeros(256, np.int32)
    with pytest.raises(ValueError, match="does not fit the scoring model's context of 256"):
        scorer.score([(too_long, np.ones_like(too_long, np.uint8))])
    with pytest.raises(ValueError, match="outside the scoring model's vocabulary"):
        scorer.score([(np.asarray([1, VOCAB], np.int32), np.asarray([0, 1], np.uint8))])


def test_preprocess_with_the_vllm_backend(stand_in, tmp_path, tokenizer_dir, chat_tokenizer):
    teacher = save_tiny_llama(tmp_path / "teacher", len(chat_tokenizer.tokenizer), seed=1)
    ref = save_tiny_llama(tmp_path / "ref", len(chat_tokenizer.tokenizer), seed=2)
    records = [{"prompt": prompt, "response": response} for prompt, response in PROBLEMS]
    source = write_jsonl(tmp_path / "t.jsonl", records)
    prefix = tmp_path / "out" / "ds"
    flags = [
        f"--input={source}", f"--output-prefix={prefix}", f"--tokenizer={tokenizer_dir}",
        f"--score-with={teacher}", f"--ref-model={ref}", "--score-topk=2",
        "--score-backend=vllm", "--score-dtype=fp32",
    ]  # fmt: skip
    args = add_preprocess_args(argparse.ArgumentParser()).parse_args(flags)
    meta = preprocess_traces(preprocess_config_from_args(args))
    assert (
        meta["teacher_logprobs_from"] == "model" and meta["config"]["scoring"]["backend"] == "vllm"
    )
    assert [llm.kwargs["gpu_memory_utilization"] for llm in StandInLLM.created] == [0.45, 0.45]
    dataset = TraceDataset(str(prefix))
    traces = [(dataset[i].tokens, dataset[i].loss_mask) for i in range(len(dataset))]
    by_teacher = CausalLMScorer(teacher, topk=2).score(traces)
    by_ref = CausalLMScorer(ref).score(traces)
    for index, (teacher_scored, ref_scored) in enumerate(zip(by_teacher, by_ref)):
        trace = dataset[index]
        np.testing.assert_allclose(trace.teacher_logprobs, teacher_scored.logprobs, atol=1e-5)
        np.testing.assert_array_equal(trace.teacher_topk_ids, teacher_scored.topk_ids)
        np.testing.assert_allclose(trace.ref_logprobs, ref_scored.logprobs, atol=1e-5)
