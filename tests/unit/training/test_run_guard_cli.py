"""`torchrun -m megatron_dcod.train` end to end: one writer per --save, no orphaned workers."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_dcod.training.run_guard import LOCK_FILE_NAME
from tests.helpers.distributed import free_port
from tests.helpers.training import REPO, logged_losses, tiny_run_flags
from tests.helpers.traces import save_hf_config, write_synthetic_traces

pytestmark = pytest.mark.slow
STARTUP_TIMEOUT_S = 120
FIRST_STEPS = re.compile(r"iteration\s+[12]/")
TRACKER = "latest_checkpointed_iteration.txt"


def run_flags(tmp_path: Path) -> list[str]:
    """A long tiny CPU run saving to `tmp_path/ckpt`, a path no other test's workers carry."""
    data = write_synthetic_traces(tmp_path / "traces", count=32)
    return [
        *tiny_run_flags(save_hf_config(tmp_path / "hf"), data, iters=100000),
        "--micro-batch-size=2",
        f"--save={tmp_path / 'ckpt'}",
        f"--load={tmp_path / 'ckpt'}",
    ]


def start_run(flags: list[str], log_path: Path) -> subprocess.Popen:
    """torchrun (1 worker) in a session of its own, logging to `log_path`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        f"--master_port={free_port()}", "-m", "megatron_dcod.train", *flags,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip


def wait_for_log(log_path: Path, pattern: re.Pattern, launcher: subprocess.Popen) -> None:
    """Until the run's log matches `pattern`; AssertionError with its tail if it ends first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not pattern.search(log_path.read_text()):
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"no {pattern.pattern!r} in the log:\n{log_path.read_text()[-6000:]}"
            )
        time.sleep(0.2)


def wait_for_end(log_path: Path, launcher: subprocess.Popen, trains: bool) -> str:
    """The log of a run once it ends; AssertionError if it logs a step though `trains` is
    False (a run that must fail before step 1) or outlasts STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while launcher.poll() is None:
        trained = not trains and FIRST_STEPS.search(log_path.read_text())
        if trained or time.monotonic() > deadline:
            raise AssertionError(f"the run did not stop:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return log_path.read_text()


def workers(save_dir: Path) -> dict[int, int]:
    """{pid: parent pid} of live training workers (not launchers) whose command line names
    `save_dir`, their data-loader processes included."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):  # not a process, or gone meanwhile
            continue
        is_worker = "megatron_dcod.train" in argv and "torch.distributed.run" not in argv
        if is_worker and f"--save={save_dir}" in argv and state != "Z":
            found[int(proc.name)] = int(ppid)
    return found


def stop(launcher: subprocess.Popen, save_dir: Path) -> None:
    """SIGKILL the launcher's group and every worker of `save_dir` (their own sessions)."""
    for pid in [launcher.pid, *workers(save_dir)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    launcher.wait(timeout=30)


def wait_until_no_workers(save_dir: Path, timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while workers(save_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return workers(save_dir)


HOLD_LOCK = (
    "import sys, time; from megatron_dcod.training.run_guard import lock_save_dir; "
    "lock = lock_save_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
)


def test_a_locked_save_is_refused_before_step_1_and_a_dead_holder_blocks_nothing(tmp_path):
    """Another process (as rank 0 of a run would) holds the lock: the run is refused before
    its first step, naming the holder; once the holder is killed with SIGKILL (a crash), its
    lock file is left behind and the same command trains."""
    flags = [*run_flags(tmp_path), "--save-interval=100000", "--exit-interval=1"]
    save_dir = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(save_dir)], cwd=REPO, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    run = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = start_run(flags, tmp_path / "refused.log")
        output = wait_for_end(tmp_path / "refused.log", run, trains=False)
        assert run.returncode != 0 and "another run is writing checkpoints" in output, output
        assert f"host {socket.gethostname()}, pid {holder.pid}," in output
        assert not (save_dir / "dcod_config.json").exists()  # nothing written into --save
        holder.kill()
        holder.wait(timeout=30)
        assert f'"pid": {holder.pid},' in (save_dir / LOCK_FILE_NAME).read_text()  # stale file
        run = start_run(flags, tmp_path / "trains.log")
        output = wait_for_end(tmp_path / "trains.log", run, trains=True)
        assert run.returncode == 0 and sorted(logged_losses(output)) == [1], output
    finally:
        holder.kill()
        if run is not None:
            stop(run, save_dir)


def test_killing_the_launcher_ends_its_workers(tmp_path):
    flags = [*run_flags(tmp_path), "--save-interval=100000", "--exit-signal-handler"]
    save_dir = tmp_path / "ckpt"
    launcher = start_run(flags, tmp_path / "run.log")
    try:
        wait_for_log(tmp_path / "run.log", FIRST_STEPS, launcher)
        assert workers(save_dir)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        left = wait_until_no_workers(save_dir, timeout_s=15)
        assert not left, f"workers {{pid: ppid}} {left} outlive their launcher"
        assert int((save_dir / TRACKER).read_text()) >= 1  # SIGTERM first: Megatron saved
    finally:
        stop(launcher, save_dir)
