#!/usr/bin/env python
"""Measure ExAccErr, the excess error a student accumulates on its own prefixes (exposure bias).

    python tools/measure_drift.py --student runs/student-hf --teacher models/teacher \
        --data heldout.jsonl [--num-prompts 64 --samples 8 --max-new-tokens 256] --out DIR

Samples responses from the student and from the teacher, scores every step of both with both
models (one forward pass each, full vocabulary), and writes R(l), ε(l) and ExAccErr(l) (MiniLLM,
arXiv 2306.08543, appendix B.5, eqs. 30–32) to DIR/summary.json, report.md and drift.png.
Run it again to resume. Definitions: megatron_dcod/eval/drift.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.config import DriftConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> DriftConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, metavar="DIR")
    parser.add_argument("--teacher", type=Path, required=True, metavar="DIR")
    parser.add_argument("--data", required=True, metavar="PATH")
    parser.add_argument("--out", type=Path, metavar="DIR", help="default runs/drift/STUDENT")
    parser.add_argument("--benchmark", default=DriftConfig.benchmark)
    parser.add_argument("--split")
    parser.add_argument("--problem-field")
    parser.add_argument("--system-prompt")
    parser.add_argument("--prompt-template", default=DriftConfig.prompt_template)
    parser.add_argument("--num-prompts", type=int, default=DriftConfig.num_prompts)
    parser.add_argument("--samples", "-k", type=int, default=DriftConfig.samples)
    parser.add_argument("--max-new-tokens", type=int, default=DriftConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=DriftConfig.temperature)
    parser.add_argument("--top-p", type=float, default=DriftConfig.top_p)
    parser.add_argument("--seed", type=int, default=DriftConfig.seed)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=DriftConfig.dtype)
    parser.add_argument("--batch-size", type=int, default=DriftConfig.batch_size)
    parser.add_argument("--batch-tokens", type=int, default=DriftConfig.batch_tokens)
    parser.add_argument("--report-lengths", type=int, nargs="+", default=())
    args = parser.parse_args(argv)
    for name in ("samples", "max_new_tokens", "batch_size", "batch_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_prompts < 0:
        parser.error("--num-prompts must be ≥ 0 (0: every prompt of --data)")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0: the expectations are over sampled prefixes")
    fields = {k: v for k, v in vars(args).items() if k != "report_lengths"}
    fields["num_prompts"] = args.num_prompts or None
    return DriftConfig(
        **{**fields, "out": args.out or Path("runs", "drift", args.student.name)},
        report_lengths=tuple(args.report_lengths),
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from megatron_dcod.eval.drift_run import measure_drift

    try:
        measure_drift(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print((config.out / "report.md").read_text())
    print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
