"""HF log-prob scoring against an independent float64 loop over positions."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_dcod.scoring.hf_scorer import CausalLMScorer
from tests.helpers.models import save_tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), VOCAB)


def make_traces():
    rng = np.random.default_rng(0)
    traces = []
    for length in (1, 2, 7, 30, 64):
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        mask = (rng.random(length) < 0.7).astype(np.uint8)
        traces.append((tokens, mask))
    traces.append((rng.integers(0, VOCAB, 9).astype(np.int32), np.zeros(9, np.uint8)))
    return traces


def reference(model_dir, tokens, mask, k):
    """float64, one trace at a time, an explicit loop over positions."""
    model = LlamaForCausalLM.from_pretrained(model_dir).double().eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]  # [T, v]
    logprobs, topk_ids, topk_values = (
        np.zeros(len(tokens)),
        np.zeros((len(tokens), k), int),
        np.zeros((len(tokens), k)),
    )
    for position in range(1, len(tokens)):
        if not mask[position]:
            continue
        logp = torch.log_softmax(logits[position - 1], dim=-1)
        logprobs[position] = logp[tokens[position]].item()
        order = torch.argsort(logp, descending=True)[:k]
        topk_ids[position], topk_values[position] = order.numpy(), logp[order].numpy()
    return logprobs, topk_ids, topk_values


@pytest.mark.parametrize("batch_tokens", [16, 4096])
def test_matches_float64_reference(model_dir, batch_tokens):
    traces = make_traces()
    scored = CausalLMScorer(model_dir, topk=3, batch_tokens=batch_tokens).score(traces)
    assert len(scored) == len(traces)
    for (tokens, mask), result in zip(traces, scored):
        logprobs, topk_ids, topk_values = reference(model_dir, tokens, mask, 3)
        assert result.logprobs.dtype == np.float32 and result.logprobs.shape == tokens.shape
        np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-5)
        assert result.logprobs[0] == 0 and not result.logprobs[mask == 0].any()
        assert result.topk_ids.dtype == np.int32 and result.topk_logprobs.dtype == np.float16
        np.testing.assert_array_equal(result.topk_ids, topk_ids)
        np.testing.assert_allclose(result.topk_logprobs, topk_values, rtol=2e-3, atol=2e-3)


def test_batched_equals_unbatched(model_dir):
    traces = make_traces()
    one_by_one = CausalLMScorer(model_dir, batch_tokens=1).score(traces)
    batched = CausalLMScorer(model_dir, batch_tokens=10**6).score(traces)
    for single, together in zip(one_by_one, batched):
        np.testing.assert_allclose(single.logprobs, together.logprobs, atol=1e-6)


def test_bad_model_dirs(model_dir, tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        CausalLMScorer(tmp_path / "missing")
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load a causal LM from .*no-weights"):
        CausalLMScorer(broken)
    with pytest.raises(ValueError, match="predicts 96 tokens but the student tokenizer has 100"):
        CausalLMScorer(model_dir, min_vocab_size=100)


def test_bf16_weights_stay_close_to_fp32(model_dir):
    traces = make_traces()
    fp32 = CausalLMScorer(model_dir).score(traces)
    bf16 = CausalLMScorer(model_dir, dtype="bf16").score(traces)
    for full, half in zip(fp32, bf16):
        assert half.logprobs.dtype == np.float32  # log-softmax in fp32 whatever the weights
        np.testing.assert_allclose(half.logprobs, full.logprobs, atol=0.05)
