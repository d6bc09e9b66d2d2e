"""HF log-prob scoring against an independent float64 loop over positions."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_dcod.inference import trace_scorer
from megatron_dcod.inference.trace_scorer import CausalLMScorer
from tests.helpers.models import save_tiny_llama

VOCAB = 96
TOPK = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), VOCAB)


@pytest.fixture(scope="module")
def float64_model(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir).double().eval()


def make_traces():
    """Lengths 1, 2, 7, 30, 64 with random masks, then 9 tokens with nothing supervised."""
    rng = np.random.default_rng(0)
    traces = []
    for length in (1, 2, 7, 30, 64):
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        mask = (rng.random(length) < 0.7).astype(np.uint8)
        traces.append((tokens, mask))
    traces.append((rng.integers(0, VOCAB, 9).astype(np.int32), np.zeros(9, np.uint8)))
    return traces


def reference(model, tokens, mask, k):
    """float64, one trace at a time, an explicit loop over positions."""
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]  # [T, v]
    logprobs = np.zeros(len(tokens))
    topk_ids = np.zeros((len(tokens), k), int)
    topk_values = np.zeros((len(tokens), k))
    for position in range(1, len(tokens)):
        if not mask[position]:
            continue
        logp = torch.log_softmax(logits[position - 1], dim=-1)  # [v], predicts token `position`
        logprobs[position] = logp[tokens[position]].item()
        order = torch.argsort(logp, descending=True)[:k]
        topk_ids[position], topk_values[position] = order.numpy(), logp[order].numpy()
    return logprobs, topk_ids, topk_values


def assert_matches_reference(scored, traces, model):
    assert len(scored) == len(traces)
    for (tokens, mask), result in zip(traces, scored):
        logprobs, topk_ids, topk_values = reference(model, tokens, mask, TOPK)
        assert result.logprobs.dtype == np.float32 and result.logprobs.shape == tokens.shape
        np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-5)
        assert result.logprobs[0] == 0 and not result.logprobs[mask == 0].any()
        assert result.topk_ids.dtype == np.int32 and result.topk_logprobs.dtype == np.float16
        assert result.topk_ids.shape == result.topk_logprobs.shape == (len(tokens), TOPK)
        np.testing.assert_array_equal(result.topk_ids, topk_ids)
        np.testing.assert_allclose(result.topk_logprobs, topk_values, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("batch_tokens", [16, 4096])  # 16: the 30 and 64 traces go alone
def test_matches_float64_reference(model_dir, float64_model, batch_tokens):
    traces = make_traces()
    scored = CausalLMScorer(model_dir, topk=TOPK, batch_tokens=batch_tokens).score(traces)
    assert_matches_reference(scored, traces, float64_model)


def test_chunked_log_softmax_matches_reference(model_dir, float64_model, monkeypatch):
    monkeypatch.setattr(trace_scorer, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 5)  # 5 positions of 1 row
    traces = make_traces()
    scored = CausalLMScorer(model_dir, topk=TOPK, batch_tokens=64).score(traces)
    assert_matches_reference(scored, traces, float64_model)


def test_batched_equals_unbatched_in_input_order(model_dir):
    traces = make_traces()[::-1]
    one_by_one = CausalLMScorer(model_dir, batch_tokens=1).score(traces)
    batched = CausalLMScorer(model_dir, batch_tokens=10**6).score(traces)
    for (tokens, _), single, together in zip(traces, one_by_one, batched):
        assert single.topk_ids is None and together.logprobs.shape == tokens.shape
        np.testing.assert_allclose(single.logprobs, together.logprobs, atol=1e-6)


def test_empty_inputs(model_dir):
    scorer = CausalLMScorer(model_dir, topk=2)
    assert scorer.score([]) == []
    (empty,) = scorer.score([(np.zeros(0, np.int32), np.zeros(0, np.uint8))])
    assert empty.logprobs.shape == (0,) and empty.topk_ids.shape == (0, 2)


def test_bad_model_dirs(model_dir, tmp_path):
    with pytest.raises(ValueError, match="missing does not exist"):
        CausalLMScorer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no config.json"):
        CausalLMScorer(tmp_path / "empty")
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load a causal LM from .*no-weights"):
        CausalLMScorer(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load a causal LM from .*no-weights"):
        CausalLMScorer(broken)


def test_bad_arguments(model_dir):
    with pytest.raises(ValueError, match="predicts 96 tokens but the student tokenizer has 100"):
        CausalLMScorer(model_dir, min_vocab_size=100)
    with pytest.raises(ValueError, match="dtype"):
        CausalLMScorer(model_dir, dtype="fp16")
    scorer = CausalLMScorer(model_dir, min_vocab_size=VOCAB)
    with pytest.raises(ValueError, match="outside the scoring model's vocabulary of 96"):
        scorer.score([(np.array([1, VOCAB], np.int32), np.ones(2, np.uint8))])


def test_bf16_weights_stay_close_to_fp32(model_dir):
    traces = make_traces()
    fp32 = CausalLMScorer(model_dir).score(traces)
    bf16 = CausalLMScorer(model_dir, dtype="bf16").score(traces)
    for full, half in zip(fp32, bf16):
        assert half.logprobs.dtype == np.float32  # log-softmax in fp32 whatever the weights
        np.testing.assert_allclose(half.logprobs, full.logprobs, atol=0.05)
