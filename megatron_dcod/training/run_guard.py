"""One writer per checkpoint directory, and no orphaned workers.

`lock_save_dir` gives rank 0 an exclusive lock on `--save` for the life of the run, so a second
run on the same directory is refused before step 1. `start_parent_watchdog` ends a torchrun
worker whose launcher is gone (torchrun starts its workers in sessions of their own, so a
`kill -9` of the launcher would otherwise leave them training and saving).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE_NAME = ".megatron-dcod.lock"
POLL_INTERVAL_S = 1.0
"""How often the watchdog compares os.getppid() with the launcher's pid: a second is cheap (one
system call) and short next to a training step or a checkpoint save."""
GRACE_PERIOD_S = 60.0
"""Seconds from the watchdog's SIGTERM to its SIGKILL: time for Megatron's
`--exit-signal-handler` to finish the step and save; a worker stuck in a collective with a dead
peer is killed after it. Meanwhile the lock still refuses a rerun on the same `--save`."""
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"
"""Set by torchrun in every worker's environment; a plain `python -m` run has no watchdog."""
_held_lock_paths: set[str] = set()


class SaveDirLocked(SystemExit):
    """Another run holds the lock on the save directory. A SystemExit, so the command line
    prints the message (directory, holder's host and pid) and exits 1 without a traceback."""


class SaveDirLock:
    """An exclusive non-blocking POSIX record lock (fcntl.lockf) on `{save}/.megatron-dcod.lock`.

    Why lockf: it is the lock shared file systems keep coherent between nodes (NFS through
    NLM/lockd on v3 and natively on v4, where Linux also maps flock() onto it; Lustre mounted
    with `-o flock`; GPFS), and the OS drops it when the process dies: a killed run leaves a
    file that blocks nothing. POSIX locks are per process: closing *any* descriptor of the file
    in the holder drops the lock (nothing else in the process may open it), forked children do
    not inherit it, and they never conflict within a process (hence `_held_lock_paths`). The
    lock lives as long as this object: the caller keeps it in a local of the function that calls
    `pretrain`; `release()` or garbage collection drops it. After a node crash, NFS frees it
    when the server's lease expires (about 90 s on NFSv4).
    """

    def __init__(self, save_dir: str | os.PathLike):
        self._fd = None
        self.path = Path(save_dir, LOCK_FILE_NAME).resolve()
        if str(self.path) in _held_lock_paths:
            raise SaveDirLocked(f"{save_dir} is already locked by this process (pid {os.getpid()})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, ENOSYS: no locking
                raise SystemExit(
                    f"error: cannot lock {self.path} ({error.strerror}): the file system of "
                    "--save needs POSIX locks (NFS with lockd, Lustre mounted with -o flock)"
                ) from None
            raise SaveDirLocked(
                f"error: another run is writing checkpoints to --save {save_dir} (host "
                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                f"{holder.get('started', '?')}; lock file {self.path}). Stop that run or choose "
                "another --save: one writer per checkpoint directory."
            ) from None
        self._fd = fd
        _held_lock_paths.add(str(self.path))
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays: deleting it would race a new taker."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a refused run must not name a finished holder
        os.close(self._fd)  # closing drops the POSIX lock
        self._fd = None
        _held_lock_paths.discard(str(self.path))

    def __del__(self):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:  # the holder is between taking the lock and writing its name
        return {}


def lock_save_dir(save_dir: str | os.PathLike) -> SaveDirLock:
    """Take the save directory's lock or raise SaveDirLocked naming its holder; keep the result
    referenced for the life of the run."""
    return SaveDirLock(save_dir)


def start_parent_watchdog(
    poll_interval_s: float = POLL_INTERVAL_S,
    grace_period_s: float = GRACE_PERIOD_S,
    termination_signal: int = signal.SIGTERM,
) -> threading.Thread | None:
    """Under torchrun, a daemon thread that ends this worker once its launcher is gone.

    The launcher is the parent at start; when it dies the worker is re-parented (to init or a
    subreaper), so os.getppid() changes. Then the worker sends itself `termination_signal`
    (Megatron's `--exit-signal-handler`, if on, saves and exits) and SIGKILL after
    `grace_period_s`. Returns the thread, or None outside torchrun: a terminal run must outlive
    its shell. Start it early: a launcher dead before this call goes unseen. Not
    prctl(PR_SET_PDEATHSIG): it fires when the parent *thread* that forked the worker exits,
    not the launcher process.
    """
    if not os.environ.get(TORCHRUN_VARIABLE):
        return None
    launcher_pid = os.getppid()
    watchdog = threading.Thread(
        target=_watch_parent,
        args=(launcher_pid, poll_interval_s, grace_period_s, termination_signal),
        name="megatron-dcod-parent-watchdog",
        daemon=True,
    )
    watchdog.start()
    return watchdog


def _watch_parent(launcher_pid, poll_interval_s, grace_period_s, termination_signal) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(poll_interval_s)
    print(
        f"megatron-dcod: the launcher (pid {launcher_pid}) is gone; ending worker pid "
        f"{os.getpid()} (signal {signal.Signals(termination_signal).name}, SIGKILL in "
        f"{grace_period_s:g} s)",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), termination_signal)
    time.sleep(grace_period_s)
    os.kill(os.getpid(), signal.SIGKILL)
