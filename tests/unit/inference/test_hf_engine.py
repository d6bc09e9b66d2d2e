"""The HF engine: batched decoding against plain unbatched `model.generate`, stop strings,
per-sequence seeds, per-request failures, and scoring against a full unpadded forward pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.inference.engine import SamplingConfig
from megatron_dcod.inference.hf_engine import HFEngine

GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=0)
PROMPTS = ["Compute 12 + 7.", "What is 3 * 4? Be brief.", "Let us think", "Add 7"]


@pytest.fixture(scope="module")
def prompt_ids(chat_tokenizer):
    return [chat_tokenizer.tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, chat_tokenizer):
    return HFEngine(tiny_model_dir, chat_tokenizer.tokenizer, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_batched_left_padded_greedy_equals_unbatched_hf_generate(engine, reference, prompt_ids):
    untouched = engine.generate(prompt_ids, GREEDY, seeds=[0] * 4)
    assert all(result.truncated and len(result.token_ids) == 12 for result in untouched)
    stop_ids = engine.stop_ids
    engine.stop_ids = stop_ids | {untouched[0].token_ids[5]}  # a token it emits ends it
    try:
        batched = engine.generate(prompt_ids, GREEDY, seeds=[0] * 4)
        stop = engine.stop_ids
    finally:
        engine.stop_ids = stop_ids
    assert batched[0].finish_reason == "eos" and len(batched[0].token_ids) <= 5
    for ids, result in zip(prompt_ids, batched):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(stop)
            )[0, len(ids) :].tolist()
        expected = out[: next((j for j, t in enumerate(out) if t in stop), len(out))]
        assert result.token_ids == expected
        assert result.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert result.truncated == (len(expected) == 12)


def test_stop_strings_end_the_text_after_the_stop_string(engine, prompt_ids):
    free = engine.generate(prompt_ids, GREEDY, seeds=[0] * 4)
    stop = free[1].text[3:5]  # two characters the second response contains
    assert stop.strip()
    stopped = engine.generate(prompt_ids, SamplingConfig(0.0, 1.0, 12, 0, stop=(stop,)), [0] * 4)
    for before, after in zip(free, stopped):
        if stop in before.text:
            cut = before.text.index(stop) + len(stop)
            assert after.finish_reason == "stop" and after.text == before.text[:cut]
            assert after.token_ids == before.token_ids[: len(after.token_ids)]
        else:
            assert after.text == before.text and after.finish_reason == before.finish_reason


def test_each_sequence_samples_from_its_own_seed(engine, prompt_ids):
    seeds = [5, 6, 7, 8]
    batched = engine.generate(prompt_ids, SAMPLED, seeds)
    alone = [engine.generate([ids], SAMPLED, [seed])[0] for ids, seed in zip(prompt_ids, seeds)]
    reordered = engine.generate(prompt_ids[::-1], SAMPLED, seeds[::-1])[::-1]
    other = engine.generate(prompt_ids, SAMPLED, [9, 10, 11, 12])
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.token_ids for g in batched] == [g.token_ids for g in reordered]
    assert [g.token_ids for g in batched] != [g.token_ids for g in other]


def test_failures_stay_with_their_request(engine, prompt_ids, monkeypatch):
    poisoned = prompt_ids[1]
    real_forward = engine.model.forward

    def forward(input_ids=None, **kwargs):
        rows = [row.tolist() for row in input_ids]
        if input_ids.shape[1] > 1 and any(_contains(row, poisoned) for row in rows):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    too_long = [5] * 300  # the model's context is 256 positions
    results = engine.generate([prompt_ids[0], poisoned, too_long, prompt_ids[2]], GREEDY, [0] * 4)
    assert results[1].error.startswith("generation failed: RuntimeError('CUDA out of memory")
    assert "context of 300 tokens fills the model's (256)" in results[2].error
    assert results[0].error is None and results[0].token_ids and results[0].finish_reason
    assert results[3].error is None and results[3].token_ids
    scores = engine.score([(prompt_ids[0], [4, 5]), (poisoned, [4]), ([], [3])], topk=2)
    assert scores[0].error is None and len(scores[0].logprobs) == 2
    assert scores[1].error.startswith("scoring failed: RuntimeError('CUDA out of memory")
    assert "empty context" in scores[2].error


def test_score_equals_an_unpadded_forward_pass(engine, reference, prompt_ids):
    requests = [
        (ids, prompt_ids[(i + 1) % 4][:n])
        for i, (ids, n) in enumerate(zip(prompt_ids, [3, 0, 5, 1]))
    ]
    scores = engine.score(requests, topk=4)
    for (context, continuation), score in zip(requests, scores):
        with torch.no_grad():
            logits = reference(torch.tensor([context + continuation])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)  # [s, v]
        expected = [
            logp[len(context) - 1 + j, token].item() for j, token in enumerate(continuation)
        ]
        assert score.logprobs == pytest.approx(expected, abs=1e-5)
        values, ids = logp[-1].topk(4)
        assert score.next_topk_ids == ids.tolist()
        assert score.next_topk_logprobs == pytest.approx(values.tolist(), abs=1e-5)


def _contains(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))
