#!/usr/bin/env python
"""Training traces from prompts with a teacher (and a student): teacher, MOTAB or SKD.

    python tools/synthesize_traces.py --method motab --prompts prompts.jsonl \
        --teacher TEACHER_DIR --student STUDENT_DIR --out traces.jsonl \
        [--responses-per-prompt 5] [--answer-field answer --keep correct] [--shard I/N]

The output goes to tools/preprocess_traces.py as it is (its `segments` become the per-token
`source` array); a rerun at the same --out resumes.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.synthesis.cli import add_synthesis_args  # noqa: E402
from megatron_dcod.synthesis.cli import synthesis_config_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = add_synthesis_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from megatron_dcod.synthesis.run import synthesize

        summary = synthesize(synthesis_config_from_args(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    keys = ("prompts_done", "trajectories", "kept", "failed", "breach_rate", "mean_t_star")
    print(json.dumps({key: summary[key] for key in keys} | {"out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
