"""pass@k against its closed form, the repetition detector, maj@k and the summary."""

from math import comb

import numpy as np
import pytest

from megatron_dcod.eval.metrics import (
    has_repetition_loop,
    majority_correct,
    pass_at_k,
    summarize,
)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 40])
def test_pass_at_k_equals_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed_form = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed_form, abs=1e-12)


def test_pass_at_1_is_the_mean_and_pass_at_n_is_any():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 0, 10) == 0.0


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_repetition_loop_detection():
    rng = np.random.default_rng(0)
    varied = rng.integers(0, 1000, 200).tolist()
    assert not has_repetition_loop(varied)
    looped = varied[:150] + [7, 8, 9] * 30  # last quarter = '7 8 9' repeated
    assert has_repetition_loop(looped)
    single_token = varied[:100] + [5] * 40
    assert has_repetition_loop(single_token)
    long_period = varied[:120] + varied[:20] * 4  # a 20-token n-gram, 4 times
    assert has_repetition_loop(long_period)
    loop_then_fresh_end = varied[:150] + [7, 8, 9] * 20 + [1, 2, 3, 4, 5, 6, 11, 12]
    assert not has_repetition_loop(loop_then_fresh_end)
    assert not has_repetition_loop([3] * 40)  # tail of 10 tokens: too short to tell


def _record(problem, sample, correct, extracted, **extra):
    return {
        "problem_index": problem,
        "sample": sample,
        "correct": correct,
        "extracted": extracted,
        "num_tokens": extra.get("num_tokens", 10),
        "truncated": extra.get("truncated", False),
        "repetition": extra.get("repetition", False),
        "reason": "correct" if correct else extra.get("reason", "wrong answer"),
    }


def test_majority_vote():
    votes = [_record(0, i, a == "4", a) for i, a in enumerate(["3", "4", "4", " 4 ", None, None])]
    assert majority_correct(votes)
    votes = [_record(0, i, a == "4", a) for i, a in enumerate(["3", "3", "4", None])]
    assert not majority_correct(votes)
    tie = [_record(0, i, a == "4", a) for i, a in enumerate(["4", "3"])]
    assert majority_correct(tie)  # ties: the earliest answer
    assert not majority_correct([_record(0, 0, False, None)])


def test_summary_from_per_item_grades():
    records = []
    for problem, correct_samples in enumerate([0, 1, 4, 2]):
        for sample in range(4):
            correct = sample < correct_samples
            records.append(
                _record(problem, sample, correct, "1" if correct else str(sample + 2),
                        num_tokens=8 * (sample + 1), truncated=sample == 3, repetition=problem == 0)
            )  # fmt: skip
    summary = summarize(records, 4)
    accuracy = summary["accuracy"]
    assert accuracy["pass@1"] == pytest.approx((0 + 0.25 + 1 + 0.5) / 4)
    assert accuracy["avg@4"] == accuracy["pass@1"]
    expected_pass2 = np.mean([1 - comb(4 - c, 2) / comb(4, 2) for c in [0, 1, 4, 2]])
    assert accuracy["pass@2"] == pytest.approx(expected_pass2)
    assert accuracy["pass@4"] == pytest.approx(0.75)
    # maj@4: problem 0 none right; 1 all answers once, tie to the earliest (right); 2, 3 right
    assert accuracy["maj@4"] == pytest.approx(0.75)
    assert summary["truncation_rate"] == pytest.approx(0.25)
    assert summary["repetition_rate"] == pytest.approx(0.25)
    assert summary["mean_response_tokens"] == pytest.approx(20.0)
    assert summary["grades"] == {"correct": 7, "wrong answer": 9}


def test_summary_refuses_missing_samples():
    with pytest.raises(ValueError, match="problem 0 has 1 samples, not 2"):
        summarize([_record(0, 0, True, "1")], 2)
