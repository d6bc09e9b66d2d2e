#!/usr/bin/env python
"""Evaluate an HF checkpoint on a math benchmark (GSM8K, MATH500, AIME, AMC, OlympiadBench, ...).

    python tools/eval_math.py --model DIR --benchmark gsm8k \
        --data data/gsm8k/test.jsonl [--limit 50] [--out DIR]
    python tools/eval_math.py --model DIR --benchmark aime24 --data aime24.jsonl -k 16
    python tools/eval_math.py --model DIR --benchmark custom --data problems.jsonl
    python tools/eval_math.py --benchmark math500 --data math500.jsonl --gold-vs-gold

Writes generations.jsonl (every response, its extracted answer, grade and reason), summary.json
and report.md to --out (default runs/eval/MODEL/BENCHMARK); run it again to resume. Benchmarks:
megatron_dcod/eval/benchmarks.py. Backend: vLLM if installed and a GPU is present, else HF.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.arguments import add_eval_args, eval_config_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config = eval_config_from_args(add_eval_args(parser).parse_args(argv))
    from megatron_dcod.eval.evaluate import evaluate, gold_vs_gold

    try:
        if config.gold_vs_gold:
            total, failures = gold_vs_gold(config)
            print("\n".join(failures))
            print(f"gold vs gold: {total - len(failures)}/{total} graded correct")
            return 1 if failures else 0
        evaluate(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print((config.out / "report.md").read_text())
    print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
