"""The decisions of MOTAB (arXiv 2605.19433) and SKD, one pure function per equation.

Equation numbers are the MOTAB paper's. Where the authors' public code and the paper differ,
the function follows the paper and its docstring says what the code does (docs/synthesis.md).
"""

from __future__ import annotations

import math
from typing import Sequence

from megatron_dcod.inference.engine import Score

TEACHER_MIN_BUDGET = 256  # tokens the teacher's continuation always gets (MOTAB step 7)


def oracle_value(logprobs: Sequence[float]) -> float:
    """Eq. 5: V_T = exp(mean log π_T(token | context, earlier step tokens)), the teacher's
    geometric-mean probability of a step. The loops never score an empty step (it ends the
    trajectory instead, as in the authors' code)."""
    if not logprobs:
        raise ValueError("the oracle value of an empty step is undefined")
    return math.exp(sum(logprobs) / len(logprobs))


def topk_entropy(topk_logprobs: Sequence[float]) -> float:
    """Eq. 6: entropy (nats) of the teacher's next-token distribution at the context, over its
    top-k probabilities renormalized to sum to 1 (0 for an empty list)."""
    if not topk_logprobs:
        return 0.0
    top = max(topk_logprobs)
    weights = [math.exp(value - top) for value in topk_logprobs]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def breach_boundary(entropy: float, epsilon0: float, theta: float) -> float:
    """Eq. 7: ε(s) = ε₀ · exp(−θ · H(s)). A hesitant teacher (high H) lowers the bar."""
    return epsilon0 * math.exp(-theta * entropy)


def is_breach(value: float, boundary: float) -> bool:
    """MOTAB step 6: the step breaches when V_T < ε(s); V_T ≥ ε(s) accepts it."""
    return value < boundary


def root_cause_step(values: Sequence[float], boundaries: Sequence[float]) -> int:
    """Eq. 8–9: t* = argmin_k δ_k, δ_k = V_T[k] − V_T[k−1], over the steps k ≥ 1 whose
    predecessor was safe (V_T[k−1] ≥ ε[k−1]); the first minimum wins ties. With no candidate
    (a breach at step 0), t* is the step of lowest V_T."""
    if not values or len(values) != len(boundaries):
        raise ValueError(f"{len(values)} oracle values for {len(boundaries)} boundaries")
    candidates = [
        k for k in range(1, len(values)) if not is_breach(values[k - 1], boundaries[k - 1])
    ]
    if not candidates:
        return min(range(len(values)), key=lambda k: values[k])
    return min(candidates, key=lambda k: values[k] - values[k - 1])


def teacher_budget(max_tokens: int, tokens_before: int) -> int:
    """MOTAB step 7: the teacher's continuation gets max(256, budget − tokens before t*)."""
    return max(TEACHER_MIN_BUDGET, max_tokens - tokens_before)


def revise_connector(student_text: str, revise_text: str) -> str:
    """Eq. 11's connector between the student's steps and the teacher's continuation.

    The authors join steps whose stop string the server trimmed with "\\n\\n" and then append
    "\\n\\nHowever,\\n\\n". Here steps keep their stop text (".\\n\\n"), so the part of the
    connector's leading whitespace that the student text already ends with is not repeated:
    the stitched layout is the authors' plus the period that ends every step.
    """
    lead = len(revise_text) - len(revise_text.lstrip())
    for overlap in range(lead, 0, -1):
        if student_text.endswith(revise_text[:overlap]):
            return revise_text[overlap:]
    return revise_text


def step_value(score: Score) -> float | None:
    """The geometric-mean probability of a scored step (Eq. 5); None when scoring failed."""
    return None if score.error is not None or not score.logprobs else oracle_value(score.logprobs)


def scored_value(score: Score) -> float:
    """V_T of a scored step, with MOTAB's fallback: a failed teacher score counts as safe."""
    value = step_value(score)
    return 1.0 if value is None else value


def scored_entropy(score: Score) -> float:
    """H at the context after a scored step, with MOTAB's fallback: a failed look-up gives 0.

    The authors' code reads one log-prob where the top-k list was meant, so its H is always 0
    and its boundary a constant ε₀ (`--theta 0` reproduces that)."""
    return 0.0 if score.error is not None else topk_entropy(score.next_topk_logprobs)


def skd_accepts(teacher_value: float | None, student_value: float | None, gamma: float) -> bool:
    """SKD: keep the student's step when the teacher's geometric-mean probability of it exceeds
    γ × the student's own (strictly); a failed score (None) sends the step to the teacher."""
    if teacher_value is None or student_value is None:
        return False
    return teacher_value > gamma * student_value
