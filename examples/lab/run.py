#!/usr/bin/env python
"""The method lab on the toy task: build a regime, write its spec, run tools/compare_methods.py.

    python examples/lab/run.py                      # the default lab (cold-short, 7 × 3 seeds)
    python examples/lab/run.py --study              # docs/results.md: 4 regimes, every method
    python examples/lab/run.py --regimes warm-long --methods sft,dcod,dcod_prefix --seeds 1,2

Regimes (examples/lab/toy_task.py): cold-short, warm-short, cold-long, warm-long. Everything
lands under --out (default runs/lab): the tasks, one lab dir per regime with its lab.json,
results.md, results.json and plots, and OUT/results.md with every regime's table. Rerunning
resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import toy_task  # noqa: E402

ROOT = HERE.parents[1]
T1 = ["--dcod-temperature", "1"]
"""The study ran before the default τ became 4 (docs/method.md): its DCOD rows say τ = 1."""
METHODS = {
    "sft": ("teacher", ["--dcod-weighting", "sft"], "SFT"),
    "dft": ("teacher", ["--dcod-weighting", "dft"], "DFT"),
    "iw_sft": ("teacher", ["--dcod-weighting", "iw_sft"], "iw-SFT"),
    "kl": ("teacher", ["--dcod-weighting", "sft", "--dcod-base-loss", "kl"], "top-k KL"),
    "todi": ("teacher", ["--dcod-weighting", "sft", "--dcod-base-loss", "todi"], "ToDi"),
    "dcod": ("teacher", ["--dcod-weighting", "dcod", *T1], "DCOD token τ=1"),
    "dcod_prefix": ("teacher", ["--dcod-weighting", "dcod", "--dcod-scope", "prefix", *T1],
                    "DCOD prefix τ=1"),
    "dcod_sequence": ("teacher", ["--dcod-weighting", "dcod", "--dcod-scope", "sequence", *T1],
                      "DCOD sequence τ=1"),
    "dcod_tau4": ("teacher", ["--dcod-weighting", "dcod", "--dcod-temperature", "4"],
                  "DCOD token τ=4 (default)"),
    "dcod_b-2": ("teacher", ["--dcod-weighting", "dcod", "--dcod-offset", "-2", *T1],
                 "DCOD token τ=1 b=−2"),
    "dcod_kl": ("teacher", ["--dcod-weighting", "dcod", "--dcod-base-loss", "kl", *T1],
                "DCOD τ=1 + KL"),
    "skd_sft": ("skd", ["--dcod-weighting", "sft"], "SKD data, SFT"),
    "skd_dcod": ("skd", ["--dcod-weighting", "dcod", "--dcod-scope", "prefix", *T1],
                 "SKD data, DCOD prefix τ=1"),
    "motab_sft": ("motab", ["--dcod-weighting", "sft"], "MOTAB data, SFT"),
    "motab_dcod": ("motab", ["--dcod-weighting", "dcod", "--dcod-scope", "prefix", *T1],
                   "MOTAB data, DCOD prefix τ=1"),
}  # fmt: skip
"""name → (dataset, train flags, label). SKD and MOTAB data are trained as the MOTAB paper
does (SFT) and with DCOD."""
DEFAULT_METHODS = ("sft", "dft", "kl", "dcod", "dcod_tau4", "dcod_prefix", "motab_sft")
STUDY_REGIMES = tuple(toy_task.all_regime_names())


def train_flags(iters: int) -> list[str]:
    """The quickstart's recipe on the DeepSpeed engine, one process: global batch 8 of packed
    256-token sequences, cosine from 1e-3; validation once, at the end."""
    return [
        "--split", "95,5,0", "--seq-length", "256", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--zero-stage", "0", "--train-iters", str(iters),
        "--lr", "1e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
        "--min-lr", "1e-4", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--log-interval", "10", "--eval-interval", str(iters), "--eval-iters", "8",
        "--save-interval", str(iters),
    ]  # fmt: skip


def write_spec(regime, paths: dict, methods: list[str], seeds: list[int], iters: int, out: Path):
    _, max_tokens, _ = toy_task.CHAINS[regime.chain]
    task, student_dir = paths["task"], paths["student_dir"]
    lengths = [str(length) for length in (16, 32, 64, 128) if length < max_tokens]
    spec = {
        "name": regime.name,
        "student": str(student_dir / "student"),
        "teacher": str(task / "teacher"),
        "datasets": {"teacher": str(student_dir / "data" / "traces")}
        | {name: str(student_dir / "data" / name) for name in ("motab", "skd")},
        "seeds": seeds,
        "train": train_flags(iters),
        "methods": {
            name: {"data": METHODS[name][0], "flags": METHODS[name][1], "label": METHODS[name][2]}
            for name in methods
        },
        "evals": {"heldout": {"data": str(task / "data" / "heldout.jsonl"), "flags": [
            "--prompt-template", "{problem}", "--max-new-tokens", str(max_tokens),
            "--batch-size", "50"]}},
        "drift": {"data": str(task / "data" / "heldout.jsonl"), "flags": [
            "--prompt-template", "{problem}", "--num-prompts", "32", "--samples", "4",
            "--max-new-tokens", str(max_tokens), "--report-lengths", *lengths]},
    }  # fmt: skip
    path = out / regime.name / "lab.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--regimes", default="cold-short", help=", ".join(STUDY_REGIMES))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (2 cores: 2)")
    parser.add_argument("--study", action="store_true",
                        help="every regime and every method (docs/results.md)")  # fmt: skip
    args = parser.parse_args()
    regimes = STUDY_REGIMES if args.study else args.regimes.split(",")
    methods = list(METHODS) if args.study else args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    try:
        regimes = [toy_task.parse_regime(name) for name in regimes]
    except ValueError as error:
        parser.error(str(error))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = args.out.resolve()  # the specs hold absolute paths
    started, tables, failed = time.monotonic(), [], False
    for regime in regimes:
        print(f"\n=== {regime.name}: the task   [{(time.monotonic() - started) / 60:.1f} min]",
              flush=True)  # fmt: skip
        synthesized = {METHODS[name][0] for name in methods} - {"teacher"}
        paths = toy_task.prepare(regime, out, sorted(synthesized))
        spec = write_spec(regime, paths, methods, seeds, args.train_iters, out)
        print(f"\n=== {regime.name}: the lab   [{(time.monotonic() - started) / 60:.1f} min]",
              flush=True)  # fmt: skip
        command = [sys.executable, str(ROOT / "tools" / "compare_methods.py"), "--spec",
                   str(spec), "--out", str(spec.parent), "--jobs", str(args.jobs)]  # fmt: skip
        print("$ " + " ".join(command), flush=True)
        failed |= subprocess.run(command, cwd=ROOT).returncode != 0
        results = spec.parent / "results.md"
        if results.exists():
            tables.append(f"## {regime.name}\n\n" + results.read_text())
    (out / "results.md").write_text("\n".join(tables))
    print(f"\nlab finished in {(time.monotonic() - started) / 60:.1f} min → {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
