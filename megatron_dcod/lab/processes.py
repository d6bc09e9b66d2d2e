"""The lab's child processes: each stage runs in a process forked from a fork server that has
imported the heavy libraries once (torch, transformers, DeepSpeed, Megatron-Core: seconds per
process otherwise), or, with a launcher (torchrun), as that program.

The fork server is a fresh single-threaded process, so its children are safe to fork whatever
threads the lab itself runs (under pytest, or a progress bar's monitor). Each child leads its
own process group, so that stopping a stage stops everything it started.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

PRELOADED = (
    "torch", "transformers", "deepspeed", "megatron.core", "megatron_dcod.engines.arguments",
    "megatron_dcod.engines.loop", "megatron_dcod.train_hf", "megatron_dcod.eval.evaluate",
    "megatron_dcod.eval.drift_run", "megatron_dcod.lab.positions", "tools.eval_math",
    "tools.measure_drift",
)  # fmt: skip
"""What the fork server imports before it forks any stage. None of them initializes CUDA."""


def _context():
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA init in the server
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED))
    return context


def start(stage, log: Path, environment: dict[str, str]):
    """Start `stage` with its output appended to `log` and `environment` added to its own;
    returns the process (`.sentinel` to wait on, `.exitcode` once it ended)."""
    process = _context().Process(target=_child, args=(stage, str(log), environment), daemon=False)
    process.start()
    return process


def wait_any(processes) -> list:
    """The processes among `processes` that have ended (blocks until at least one has)."""
    ready = set(wait([process.sentinel for process in processes]))
    ended = [process for process in processes if process.sentinel in ready]
    for process in ended:
        process.join()
    return ended


def stop(processes, grace_s: float = 120.0) -> None:
    """SIGTERM each process group (a training saves and exits), wait up to `grace_s` for
    them, then SIGKILL what is left, so that a rerun does not race a child still saving."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.join()


def _child(stage, log: str, environment: dict[str, str]) -> None:
    """In the forked child: own process group, output to the log, then the stage; never
    returns (the exit code is the stage's)."""
    code = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
        print(f"[lab] pid {os.getpid()}", flush=True)  # the process group the lab stops
        os.environ.update(environment)
        os.chdir(Path(__file__).resolve().parents[2])  # the checkout: tools/ is importable
        if stage.launcher:
            os.execvp(stage.launcher[0], stage.command)
        code = _call(stage, environment.get("OMP_NUM_THREADS"))
    except BaseException:  # report whatever went wrong in the log, then exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _call(stage, threads: str | None) -> int:
    """`stage.entry(stage.argv)`, its SystemExit or return value as an exit code."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    module, function = stage.entry.split(":")
    program = stage.command[2] if stage.command[1] == "-m" else stage.command[1]
    sys.argv = [program, *stage.argv]  # argparse's program name in usage messages
    try:
        result = getattr(importlib.import_module(module), function)(stage.argv)
    except SystemExit as exit:
        if exit.code not in (None, 0) and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return result if isinstance(result, int) else 0
