"""The quickstart's synthetic task: multi-step addition and subtraction, solved by program.

A problem is a start number and 2–4 operations, e.g. `Compute 8 + 5 - 6 + 3.`; every running
total stays in 0..MAX_TOTAL so that each step is one fact a tiny model can learn. The same
problem has two solution styles, so that teacher and student start from different
distributions (docs/method.md §1: DCOD weighs the teacher's tokens by the student's support):

    teacher   Step 1: 8 + 5 = 13.         student   8 plus 5 gives 13, minus 6 gives 7,
              Step 2: 13 - 6 = 7.                   plus 3 gives 10. So \\boxed{10}.
              Step 3: 7 + 3 = 10.
              The answer is \\boxed{10}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_START = 10
MAX_OPERAND = 5
MAX_TOTAL = 20
SHORT_CHAINS = (2, 4)
"""Operations per problem (inclusive range) of the quickstart; the lab's long chains: 6–8."""


@dataclass(frozen=True)
class Problem:
    start: int
    operations: tuple[tuple[str, int], ...]
    """(`+` or `-`, operand) in order."""

    @property
    def text(self) -> str:
        terms = " ".join(f"{sign} {operand}" for sign, operand in self.operations)
        return f"Compute {self.start} {terms}."

    def running_totals(self) -> list[int]:
        totals = [self.start]
        for sign, operand in self.operations:
            totals.append(apply(totals[-1], sign, operand))
        return totals

    @property
    def answer(self) -> int:
        return self.running_totals()[-1]


def apply(total: int, sign: str, operand: int) -> int:
    return total + operand if sign == "+" else total - operand


def random_problem(rng: random.Random, chain: tuple[int, int] = SHORT_CHAINS) -> Problem:
    start = rng.randint(1, MAX_START)
    total, operations = start, []
    for _ in range(rng.randint(*chain)):
        operand, sign = rng.randint(1, MAX_OPERAND), rng.choice("+-")
        if not 0 <= apply(total, sign, operand) <= MAX_TOTAL:
            sign = "-" if sign == "+" else "+"  # the other sign always stays in range
        total = apply(total, sign, operand)
        operations.append((sign, operand))
    return Problem(start, tuple(operations))


def problems(
    count: int,
    seed: int,
    exclude: frozenset[str] = frozenset(),
    chain: tuple[int, int] = SHORT_CHAINS,
) -> list[Problem]:
    """`count` distinct problems of `chain` operations whose text is not in `exclude`
    (held-out sets stay held out)."""
    rng, seen, chosen = random.Random(seed), set(exclude), []
    while len(chosen) < count:
        problem = random_problem(rng, chain)
        if problem.text not in seen:
            seen.add(problem.text)
            chosen.append(problem)
    return chosen


def teacher_solution(problem: Problem) -> str:
    totals = problem.running_totals()
    steps = [
        f"Step {number}: {before} {sign} {operand} = {after}."
        for number, (before, (sign, operand), after) in enumerate(
            zip(totals, problem.operations, totals[1:]), start=1
        )
    ]
    return "\n".join(steps + [f"The answer is \\boxed{{{problem.answer}}}."])


def student_solution(problem: Problem) -> str:
    words = {"+": "plus", "-": "minus"}
    totals = problem.running_totals()
    clauses = [
        f"{words[sign]} {operand} gives {after}"
        for (sign, operand), after in zip(problem.operations, totals[1:])
    ]
    return f"{problem.start} {', '.join(clauses)}. So \\boxed{{{problem.answer}}}."
