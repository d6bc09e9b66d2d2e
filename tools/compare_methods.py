#!/usr/bin/env python
"""The method lab: every method of a spec × every seed, trained, graded and measured the same way.

    python tools/compare_methods.py --spec lab.yaml --out runs/lab [--jobs 2]
    python tools/compare_methods.py --spec lab.yaml --out runs/lab --list-runs
    python tools/compare_methods.py --spec lab.yaml --out runs/lab --only dcod.seed1 --no-report
    python tools/compare_methods.py --spec lab.yaml --out runs/lab --report-only

Each run is the project's own commands: python -m megatron_dcod.train_hf (the DeepSpeed engine,
an HF student in and out), tools/eval_math.py per evaluation, tools/measure_drift.py (ExAccErr)
and the weights by position. Rerunning resumes; a failed run is reported and the others go on.
Writes OUT/results.md, results.json and the plots; the spec format: docs/lab.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON or YAML lab spec")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="these runs (--list-runs)")
    parser.add_argument("--list-runs", action="store_true", help="print the run ids and exit")
    parser.add_argument("--report-only", action="store_true", help="tables and plots only")
    parser.add_argument("--no-report", action="store_true", help="run, but write no tables")
    parser.add_argument("--baseline", help="method the Δ column compares to (default: the first)")
    parser.add_argument(
        "--train-launcher",
        help='the training command\'s launcher (default "python -m"; e.g. "torchrun '
        '--nproc_per_node 8 -m" on a GPU node)',
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    from megatron_dcod.lab.results import write_results
    from megatron_dcod.lab.runner import Lab, execute
    from megatron_dcod.lab.spec import SpecError, load_spec

    try:
        lab = Lab(load_spec(args.spec), args.out, args.train_launcher)
        runs = lab.runs(set(args.only) if args.only else None)
    except (SpecError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.baseline and args.baseline not in {m.name for m in lab.spec.methods}:
        parser.error(f"--baseline {args.baseline}: not a method of {args.spec}")
    if args.list_runs:
        print("\n".join(run.id for run in runs))
        return 0
    failed = [] if args.report_only else execute(lab, runs, args.jobs)
    if not args.no_report:
        results = write_results(lab, args.baseline)
        print("\n" + results["table"])
        print(f"wrote {args.out / 'results.md'} and results.json")
    if failed:
        print(f"error: {len(failed)} runs failed: {', '.join(failed)} (their logs: FAILED "
              "files under runs/); rerun to retry them", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
