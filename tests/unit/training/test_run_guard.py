"""The save-directory lock and the parent watchdog, on real processes."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_dcod.training.run_guard import (
    LOCK_FILE_NAME,
    TORCHRUN_VARIABLE,
    SaveDirLocked,
    lock_save_dir,
)
from tests.helpers.training import REPO

HOLD_LOCK = """
import sys, time
from megatron_dcod.training.run_guard import lock_save_dir
lock = lock_save_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""
TAKE_LOCK = """
import sys
from megatron_dcod.training.run_guard import lock_save_dir
lock_save_dir(sys.argv[1]).release()
print("took the lock")
"""
WATCHED_CHILD = """
import os, signal, sys, time
from pathlib import Path
from megatron_dcod.training.run_guard import start_parent_watchdog
marker = Path(sys.argv[1])
def note_sigterm(signum, frame):  # survives SIGTERM, so only the hard exit can end it
    marker.write_text("got SIGTERM")
signal.signal(signal.SIGTERM, note_sigterm)
watchdog = start_parent_watchdog(poll_interval_s=0.1, grace_period_s=float(sys.argv[2]))
print(os.getpid(), watchdog is not None, flush=True)
time.sleep(600)
"""
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
time.sleep(600)
"""


def python(script: str, *args, env=None, **popen_kwargs) -> subprocess.Popen:
    """A `python -c script args` child in the repository, stdout piped."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env=env or os.environ,
        stdout=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no reaper collected counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_alive(pid)


def kill(*processes) -> None:
    """SIGKILL each of `processes` (Popen objects or pids) that is still there."""
    for process in processes:
        try:
            if isinstance(process, subprocess.Popen):
                process.kill()
                process.wait(timeout=10)
            else:
                os.kill(process, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass


def take_lock(save_dir) -> subprocess.CompletedProcess:
    """Another process trying to take the lock of `save_dir`."""
    command = [sys.executable, "-c", TAKE_LOCK, str(save_dir)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_held_lock_refuses_another_process_naming_the_holder(tmp_path):
    lock = lock_save_dir(tmp_path / "ckpt")  # creates the directory
    try:
        refused = take_lock(tmp_path / "ckpt")
        assert refused.returncode == 1, refused
        assert "another run is writing checkpoints" in refused.stderr
        assert f"host {socket.gethostname()}, pid {os.getpid()}," in refused.stderr
        assert str(tmp_path / "ckpt") in refused.stderr
        with pytest.raises(SaveDirLocked, match="already locked by this process"):
            lock_save_dir(tmp_path / "ckpt")  # POSIX locks never conflict within a process
    finally:
        lock.release()
    taken = take_lock(tmp_path / "ckpt")
    assert taken.returncode == 0 and "took the lock" in taken.stdout, taken.stderr


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    holder = python(HOLD_LOCK, tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveDirLocked, match=f"pid {holder.pid},"):
            lock_save_dir(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        kill(holder)
    assert f'"pid": {holder.pid}' in (tmp_path / LOCK_FILE_NAME).read_text()  # stale file
    lock = lock_save_dir(tmp_path)  # ... which blocks nothing
    assert lock.holder["pid"] == os.getpid()
    lock.release()
    lock.release()  # idempotent


def start_chain(tmp_path, torchrun: bool, grace_period_s: float = 30.0):
    """This process → parent → child; the child runs the watchdog and notes a SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k != TORCHRUN_VARIABLE}
    if torchrun:
        env[TORCHRUN_VARIABLE] = "test-run"
    marker = tmp_path / "sigterm"
    parent = python(PARENT, WATCHED_CHILD, marker, grace_period_s, env=env)
    child_pid, watching = parent.stdout.readline().split()
    assert watching == str(torchrun)
    return parent, int(child_pid), marker


def test_watchdog_ends_a_torchrun_worker_whose_launcher_died(tmp_path):
    parent, child_pid, marker = start_chain(tmp_path, torchrun=True, grace_period_s=1.0)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_until_dead(child_pid, timeout_s=10), "the orphaned worker still runs"
        assert marker.read_text() == "got SIGTERM"  # SIGTERM first, SIGKILL after the grace
    finally:
        kill(parent, child_pid)


def test_watchdog_spares_a_run_outside_torchrun(tmp_path):
    parent, child_pid, marker = start_chain(tmp_path, torchrun=False)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert not wait_until_dead(child_pid, timeout_s=2)
        assert not marker.exists()
    finally:
        kill(parent, child_pid)


def test_a_file_system_without_locks_is_named(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(SystemExit, match="needs POSIX locks") as refused:
        lock_save_dir(tmp_path)
    assert not isinstance(refused.value, SaveDirLocked)  # not "another run"
