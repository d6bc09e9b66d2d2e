"""The lab's runs and their stages, each one of the project's own commands, resumable.

    OUT/runs/METHOD.seedS/          one trained student
        ckpt/  hf/                  python -m megatron_dcod.train_hf (--save, --save-hf)
        eval/NAME/                  tools/eval_math.py on each evaluation of the spec
        drift/                      tools/measure_drift.py against the teacher
        weights.json                python -m megatron_dcod.lab.positions: mean w by position
        logs/STAGE.log, timings.json, FAILED (the stage that failed, while it is not fixed)
    OUT/runs/initial/               the student before training: eval/ and drift/ only

A stage whose output exists is skipped, so rerunning the lab resumes it; a training stage that
was killed resumes from its last checkpoint (train_hf's --load). A failed stage marks its run
failed and the lab goes on with the others. Each stage runs in a child forked from a server
that imported the libraries once (megatron_dcod/lab/processes.py), or, with a training launcher
such as torchrun, as that program.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_dcod.lab import processes
from megatron_dcod.lab.spec import DEFAULT_DATASET, LabSpec, MethodSpec

ROOT = Path(__file__).resolve().parents[2]
INITIAL = "initial"
"""Run id of the untrained student's evaluation."""


@dataclass(frozen=True)
class Run:
    """One method at one seed (method None: the initial student, evaluated only)."""

    method: MethodSpec | None
    seed: int | None

    @property
    def id(self) -> str:
        return INITIAL if self.method is None else f"{self.method.name}.seed{self.seed}"


@dataclass(frozen=True)
class Stage:
    """One command of a run: `entry` (module:function, called with `argv` in a forked child of
    the lab, which has imported the heavy libraries once), or `launcher` + argv when the stage
    must be its own program (a torchrun launch)."""

    name: str
    entry: str
    argv: list[str]
    output: Path
    """Exists once the stage has finished."""
    launcher: tuple[str, ...] = ()

    @property
    def command(self) -> list[str]:
        """The equivalent command line (what the stage's log starts with)."""
        if self.launcher:
            return [*self.launcher, *self.argv]
        module = self.entry.split(":")[0]
        if module.startswith("tools."):
            return [sys.executable, str(ROOT / "tools" / f"{module[6:]}.py"), *self.argv]
        return [sys.executable, "-m", module, *self.argv]


class Lab:
    """Plans the runs of a spec under `out` and the commands of their stages."""

    def __init__(self, spec: LabSpec, out: Path, train_launcher: str | None = None):
        self.spec, self.out = spec, Path(out).resolve()  # the children run in the repo root
        self.train_launcher = tuple(shlex.split(train_launcher)) if train_launcher else ()

    def runs(self, only: set[str] | None = None) -> list[Run]:
        runs = [Run(None, None)] if self.spec.initial_student_row else []
        runs += [Run(m, s) for m in self.spec.methods for s in self.spec.seeds]
        if only:
            unknown = sorted(only - {run.id for run in runs})
            if unknown:
                raise ValueError(f"--only: unknown runs {unknown}; see --list-runs")
            runs = [run for run in runs if run.id in only]
        return runs

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.id

    def model_dir(self, run: Run) -> Path:
        return self.spec.student if run.method is None else self.run_dir(run) / "hf"

    def stages(self, run: Run) -> list[Stage]:
        directory, model = self.run_dir(run), self.model_dir(run)
        stages = [] if run.method is None else [self._train(run)]
        for evaluation in self.spec.evals:
            out = directory / "eval" / evaluation.name
            argv = ["--model", str(model), "--benchmark", evaluation.benchmark, "--data",
                    str(evaluation.data), "--out", str(out), *evaluation.flags]  # fmt: skip
            stages.append(
                Stage(f"eval {evaluation.name}", "tools.eval_math:main", argv, out / "summary.json")
            )
        if self.spec.drift is not None:
            out = directory / "drift"
            argv = ["--student", str(model), "--teacher", str(self.spec.teacher),
                    "--data", str(self.spec.drift.data), "--out", str(out),
                    *self.spec.drift.flags]  # fmt: skip
            stages.append(Stage("drift", "tools.measure_drift:main", argv, out / "summary.json"))
        if run.method is not None:
            stages.append(self._positions(run))
        return stages

    def _train(self, run: Run) -> Stage:
        directory = self.run_dir(run)
        argv = [
            "--hf-model", str(self.spec.student),
            "--data-path", str(self._data(run)),
            "--seed", str(run.seed),
            "--save", str(directory / "ckpt"), "--load", str(directory / "ckpt"),
            "--save-hf", str(directory / "hf"),
            *self.spec.train_flags, *run.method.flags,
        ]  # fmt: skip
        launcher = (*self.train_launcher, "megatron_dcod.train_hf") if self.train_launcher else ()
        return Stage(
            "train", "megatron_dcod.train_hf:main", argv, directory / "train.done", launcher
        )

    def _data(self, run: Run) -> Path:
        return self.spec.datasets[run.method.data]

    def _positions(self, run: Run) -> Stage:
        argv = [
            "--student", str(self.model_dir(run)), "--initial-student", str(self.spec.student),
            "--data-path", str(self.spec.datasets.get(DEFAULT_DATASET, self._data(run))),
            "--out", str(self.run_dir(run) / "weights.json"),
            "--", *self.spec.train_flags, *run.method.flags,
        ]  # fmt: skip
        output = self.run_dir(run) / "weights.json"
        return Stage("weights", "megatron_dcod.lab.positions:main", argv, output)


def execute(lab: Lab, runs: list[Run], jobs: int = 1) -> list[str]:
    """Run every unfinished stage, `jobs` runs at a time (each with its share of the cores and
    of CUDA_VISIBLE_DEVICES); returns the ids of the runs that failed."""
    queue = deque((run, [s for s in lab.stages(run) if not s.output.exists()]) for run in runs)
    queue = deque((run, stages) for run, stages in queue if stages)
    total = sum(len(stages) for _, stages in queue)
    done = sum(len(lab.stages(run)) for run in runs) - total
    print(f"lab {lab.spec.name}: {len(runs)} runs, {done} stages done, {total} to run "
          f"({jobs} at a time) → {lab.out}", flush=True)  # fmt: skip
    if not total:
        return []
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None
    previous_handler = signal.signal(signal.SIGTERM, _raise_exit)
    active: dict = {}  # process → (run, its stages left, start time, slot)
    free_slots, failed = list(range(jobs)), []
    progress = tqdm(total=total, desc="lab", unit="stage")

    def launch(run: Run, stages: list[Stage], slot: int) -> None:
        environment = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        environment |= (
            {"CUDA_VISIBLE_DEVICES": devices} if (devices := _devices(slot, jobs)) else {}
        )
        process = processes.start(stages[0], _log_header(lab, run, stages[0]), environment)
        active[process] = (run, stages, time.monotonic(), slot)

    try:
        while queue or active:
            while queue and free_slots:
                run, stages = queue.popleft()
                (lab.run_dir(run) / "FAILED").unlink(missing_ok=True)
                launch(run, stages, free_slots.pop(0))
            for process in processes.wait_any(list(active)):
                run, stages, started, slot = active.pop(process)
                ok = _finished(lab, run, stages[0], process.exitcode, started, progress)
                if not ok:
                    failed.append(run.id)
                    progress.update(len(stages) - 1)
                if ok and stages[1:]:
                    launch(run, stages[1:], slot)
                else:
                    free_slots.append(slot)
    finally:
        processes.stop(list(active))
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
    return failed


def _finished(lab: Lab, run: Run, stage: Stage, code: int, started: float, progress) -> bool:
    """Record a stage that ended; True if it succeeded (a training must have reached its
    last iteration), else its run is marked FAILED with the reason and the log."""
    seconds = time.monotonic() - started
    _record_time(lab.run_dir(run), stage.name, seconds)
    progress.update(1)
    why = f"exit {code}" if code != 0 else None
    if why is None and stage.name == "train":
        why = _unfinished_training(stage)
    if why is not None:
        log = _log_path(lab, run, stage)
        (lab.run_dir(run) / "FAILED").write_text(f"{stage.name} ({why}): {log}\n")
        progress.write(f"{run.id}: {stage.name} failed ({why}); log {log}")
        return False
    if stage.name == "train":
        stage.output.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    progress.write(f"{run.id}: {stage.name} {seconds:.1f} s")
    return True


def _raise_exit(signum, frame) -> None:
    raise SystemExit(f"lab: signal {signum}: stopping the running stages (rerun to resume)")


def _unfinished_training(stage: Stage) -> str | None:
    """Why a training that exited 0 is not done (it stopped early: --exit-interval, SIGTERM
    with --exit-signal-handler), else None; from the checkpoint DeepSpeed's `latest` names."""
    from megatron_dcod.engines.checkpoint import LATEST_FILE

    flags = stage.argv
    iters = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--train-iters"]
    latest = Path(flags[flags.index("--save") + 1]) / LATEST_FILE
    if not iters or not latest.is_file():
        return None if not iters else f"no checkpoint at {latest.parent}"
    reached = int(latest.read_text().strip().removeprefix("iter_"))
    return None if reached >= int(iters[-1]) else f"stopped at iteration {reached} of {iters[-1]}"


def _log_path(lab: Lab, run: Run, stage: Stage) -> Path:
    return lab.run_dir(run) / "logs" / f"{stage.name.replace(' ', '_')}.log"


def _devices(slot: int, jobs: int) -> str | None:
    """The GPUs of a slot: its share of CUDA_VISIBLE_DEVICES when that lists one per job or
    more (None: the child sees what the lab sees)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if jobs < 2 or len(visible) < jobs:
        return None
    share = len(visible) // jobs
    return ",".join(visible[slot * share : (slot + 1) * share])


def _log_header(lab: Lab, run: Run, stage: Stage) -> Path:
    """The stage's log with this attempt's header appended (earlier attempts are kept)."""
    log = _log_path(lab, run, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as header:
        header.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {shlex.join(stage.command)}\n")
    return log


def _record_time(directory: Path, stage: str, seconds: float) -> None:
    path = directory / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(seconds, 2)
    path.write_text(json.dumps(timings, indent=1) + "\n")
