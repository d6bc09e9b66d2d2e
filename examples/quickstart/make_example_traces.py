#!/usr/bin/env python
"""Regenerate examples/quickstart/traces.jsonl: small multi-step arithmetic problems with
worked, step-by-step solutions (the bundled example teacher traces)."""

import json
import random
from pathlib import Path


def solve(numbers: list[int]) -> tuple[str, int]:
    """A step-by-step running sum, one blank-line separated step per addition."""
    total, steps = numbers[0], [f"Start with {numbers[0]}."]
    for number in numbers[1:]:
        steps.append(f"Add {number}: {total} + {number} = {total + number}.")
        total += number
    steps.append(f"The answer is \\boxed{{{total}}}.")
    return "\n\n".join(steps), total


def main() -> None:
    rng = random.Random(2605)
    out = Path(__file__).with_name("traces.jsonl")
    with open(out, "w") as records:
        for index in range(200):
            numbers = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
            response, answer = solve(numbers)
            prompt = f"Compute {' + '.join(map(str, numbers))}. Reason step by step."
            record = {"id": index, "prompt": prompt, "response": response, "answer": str(answer)}
            records.write(json.dumps(record) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
