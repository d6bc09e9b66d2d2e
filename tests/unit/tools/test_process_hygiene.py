"""The tools leave no process behind: whatever a tool starts (tokenizer workers, the resource
tracker of multiprocessing's spawn context, ...) is gone when it exits, on success, on bad input
and on Ctrl-C.

Each tool runs in a process group of its own while this process is the child subreaper, so a
process the tool did not wait for is handed to this process and stays visible, as a zombie if it
exits meanwhile, until the test reaps it: a leftover cannot slip away by exiting just after the
tool, whatever init does on the machine.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..conftest import write_jsonl
from .test_preprocess_traces_cli import ROOT, preprocess_tool

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl"),
    pytest.mark.slow,  # each test starts a tool: seconds of imports
]

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
TOOL_TIMEOUT_S = 120
LEFTOVER_GRACE_S = 2.0
"""How long a process of the tool's group may take to go away after the tool's exit."""


class GroupedTool:
    """A tool running in a process group of its own (the group's id is its pid), with the
    command line of every process seen in the group: one that has exited shows none."""

    def __init__(self, command: list[str], tmp_path: Path):
        self.tmp_path = tmp_path
        with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
            self.popen = subprocess.Popen(
                command, stdout=out, stderr=err, start_new_session=True, cwd=tmp_path
            )
        self.commands: dict[int, str] = {}

    def group(self) -> dict[int, str]:
        """{pid: "state command line"} of the group's processes, zombies included."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                state, _, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if int(group) != self.popen.pid:
                    continue
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, ValueError, UnicodeDecodeError):  # gone meanwhile
                continue
            pid = int(proc.name)
            self.commands[pid] = command or self.commands.get(pid, "")
            found[pid] = f"{state} {self.commands[pid] or '?'}"
        return found

    def wait(self) -> int:
        """The tool's exit status, watching its group until it exits."""
        deadline = time.monotonic() + TOOL_TIMEOUT_S
        while self.popen.poll() is None:
            assert time.monotonic() < deadline, f"still running after {TOOL_TIMEOUT_S} s"
            self.group()
            time.sleep(0.1)
        return self.popen.returncode

    def leftovers(self) -> dict[int, str]:
        """Processes of the group still there `LEFTOVER_GRACE_S` after the tool's exit (none as
        soon as there are none); kills and reaps them so that they cannot outlive the test."""
        self.wait()
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (left := self.group()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):  # not ours: it was not left to us
                pass
        return left

    def stderr(self) -> str:
        return (self.tmp_path / "stderr").read_text()


@contextmanager
def child_subreaper():
    """This process adopts the orphans of its descendants for the duration of the block."""
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int()
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, previous.value, 0, 0, 0)


@contextmanager
def tool_in_own_group(tmp_path: Path, script: str, *args):
    """Run tools/`script` with `args` as a GroupedTool; what is left of its group is killed."""
    command = [sys.executable, str(ROOT / "tools" / script), *map(str, args)]
    with child_subreaper():
        tool = GroupedTool(command, tmp_path)
        try:
            yield tool
        finally:
            if tool.popen.poll() is None:  # the test failed before the tool's end
                os.killpg(tool.popen.pid, signal.SIGKILL)
            tool.leftovers()  # reaped, whatever the test found


def assert_no_leftovers(tool: GroupedTool) -> None:
    left = tool.leftovers()
    status = tool.popen.returncode
    assert not left, f"alive after the tool exited ({status}): {left}\n{tool.stderr()[-3000:]}"


def plain_records(count: int) -> list[dict]:
    """Records without teacher arrays: quick to make in any number."""
    return [{"prompt": f"What is {i} + 1?", "response": f"{i + 1}."} for i in range(count)]


def preprocess_args(tmp_path: Path, source: Path, tokenizer_dir: Path, *extra) -> list:
    prefix = tmp_path / "out" / "ds"
    return ["--input", source, "--output-prefix", prefix, "--tokenizer", tokenizer_dir, *extra]


def wait_for_workers(tool: GroupedTool, workers: int) -> None:
    """Until the tool's group holds its tokenizer workers (spawned from its pool)."""
    deadline = time.monotonic() + TOOL_TIMEOUT_S
    while sum("spawn_main" in command for command in tool.group().values()) < workers:
        assert tool.popen.poll() is None, f"the tool ended ({tool.popen.returncode}) too soon"
        assert time.monotonic() < deadline, "the tokenizer workers never started"
        time.sleep(0.05)


def test_preprocess_success_with_workers(tmp_path, tokenizer_dir, teacher_records):
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records * 20)  # chunks for both
    args = preprocess_args(tmp_path, source, tokenizer_dir, "--workers", 2)
    with tool_in_own_group(tmp_path, "preprocess_traces.py", *args) as tool:
        assert_no_leftovers(tool)
    assert tool.popen.returncode == 0, tool.stderr()
    assert sum("spawn_main" in command for command in tool.commands.values()) == 2


def test_preprocess_bad_record(tmp_path, tokenizer_dir):
    """The bad record fails the run while the workers still tokenize later chunks."""
    source = write_jsonl(tmp_path / "traces.jsonl", [{"prompt": "p"}, *plain_records(400)])
    args = preprocess_args(tmp_path, source, tokenizer_dir, "--workers", 2)
    with tool_in_own_group(tmp_path, "preprocess_traces.py", *args) as tool:
        assert_no_leftovers(tool)
    assert tool.popen.returncode == 1
    assert f"{source}:1: missing field 'response'" in tool.stderr()


def test_preprocess_interrupted(tmp_path, tokenizer_dir):
    """Ctrl-C mid-run: SIGINT to the whole group, the workers included."""
    source = write_jsonl(tmp_path / "traces.jsonl", plain_records(50000))
    args = preprocess_args(tmp_path, source, tokenizer_dir, "--workers", 2, "--shard-records", 500)
    with tool_in_own_group(tmp_path, "preprocess_traces.py", *args) as tool:
        wait_for_workers(tool, 2)
        time.sleep(0.5)  # let the workers take chunks
        os.killpg(tool.popen.pid, signal.SIGINT)
        assert_no_leftovers(tool)
    assert tool.popen.returncode != 0, "the tool finished before it was interrupted"
    assert "KeyboardInterrupt" in tool.stderr()


def test_inspect_traces(tmp_path, tokenizer_dir, teacher_records):
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records)
    args = preprocess_args(tmp_path, source, tokenizer_dir)
    assert preprocess_tool.main(list(map(str, args))) == 0
    prefix = tmp_path / "out" / "ds"
    with tool_in_own_group(tmp_path, "inspect_traces.py", prefix, "--json") as tool:
        assert_no_leftovers(tool)
    assert tool.popen.returncode == 0, tool.stderr()
    summary = json.loads((tmp_path / "stdout").read_text().split("\n", 1)[0])
    assert summary["traces"] == len(teacher_records)
