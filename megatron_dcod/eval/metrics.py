"""Metrics of an evaluation run, computed from its graded generations.

Accuracy: pass@1 (the mean correctness over the k samples of a problem, i.e. avg@k; greedy
when k = 1 at temperature 0), the unbiased pass@k estimator of Chen et al. 2021 (arXiv
2107.03374, eq. 1) for k = 2, 4, ... up to the samples per problem, and maj@k (majority vote
over the extracted answers). Behaviour: truncation rate (stopped by max new tokens), mean
response length in tokens, repetition rate (responses whose last quarter is an n-gram loop).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

REPETITION_TAIL_FRACTION = 0.25
REPETITION_MIN_TAIL_TOKENS = 16
"""Shorter tails are never called loops (too few tokens to tell)."""
REPETITION_MIN_REPEATS = 2
"""A loop is a period that fills the tail at least this many times."""


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k), as the stable
    product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= correct <= samples or not 1 <= k <= samples:
        raise ValueError(
            f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={samples} c={correct} k={k})"
        )
    if samples - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def has_repetition_loop(token_ids: Sequence[int]) -> bool:
    """Whether the last quarter of a response is periodic: some period p with the tail made of
    at least REPETITION_MIN_REPEATS copies of a p-token n-gram (tail[i] == tail[i + p])."""
    tail_length = int(np.ceil(len(token_ids) * REPETITION_TAIL_FRACTION))
    if tail_length < REPETITION_MIN_TAIL_TOKENS:
        return False
    tail = np.asarray(token_ids[-tail_length:])  # [L]
    for period in range(1, tail_length // REPETITION_MIN_REPEATS + 1):
        if np.array_equal(tail[period:], tail[:-period]):
            return True
    return False


def answer_key(extracted: str | None) -> str | None:
    """What maj@k votes on: the extracted answer without whitespace or '$'."""
    if extracted is None:
        return None
    key = "".join(extracted.replace("$", "").split())
    return key or None


def majority_correct(samples: Sequence[dict]) -> bool:
    """maj@k of one problem: the grade of the most frequent answer (ties: the earliest)."""
    votes = Counter(answer_key(s["extracted"]) for s in samples)
    votes.pop(None, None)
    if not votes:
        return False
    winner = max(votes, key=lambda key: votes[key])  # first-inserted wins ties
    return any(s["correct"] for s in samples if answer_key(s["extracted"]) == winner)


def summarize(generations: Iterable[dict], samples_per_problem: int) -> dict:
    """Metrics over graded generation records (fields: problem_index, correct, extracted,
    num_tokens, truncated, repetition, reason)."""
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for record in generations:
        by_problem[record["problem_index"]].append(record)
    if not by_problem:
        raise ValueError("no generations to summarize")
    for index, samples in by_problem.items():
        if len(samples) != samples_per_problem:
            raise ValueError(
                f"problem {index} has {len(samples)} samples, not {samples_per_problem}"
            )
    flat = [record for samples in by_problem.values() for record in samples]
    correct = [sum(record["correct"] for record in samples) for samples in by_problem.values()]
    n = samples_per_problem
    metrics = {"pass@1": float(np.mean([c / n for c in correct]))}
    if n > 1:
        metrics[f"avg@{n}"] = metrics["pass@1"]
        for k in _powers_of_two_up_to(n)[1:]:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
        maj = [majority_correct(samples) for samples in by_problem.values()]
        metrics[f"maj@{n}"] = float(np.mean(maj))
    return {
        "problems": len(by_problem),
        "samples_per_problem": n,
        "accuracy": metrics,
        "truncation_rate": float(np.mean([record["truncated"] for record in flat])),
        "mean_response_tokens": float(np.mean([record["num_tokens"] for record in flat])),
        "repetition_rate": float(np.mean([record["repetition"] for record in flat])),
        "grades": dict(Counter(_reason_class(record["reason"]) for record in flat)),
    }


def _powers_of_two_up_to(n: int) -> list[int]:
    powers = [1]
    while powers[-1] * 2 < n:
        powers.append(powers[-1] * 2)
    return powers + ([n] if powers[-1] != n else [])


def _reason_class(reason: str) -> str:
    """'grading error: ZeroDivisionError(...)' -> 'grading error'."""
    return reason.split(":", 1)[0]
