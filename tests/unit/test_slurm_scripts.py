"""slurm/*.sh: syntax, shellcheck, dry runs whose commands the tools' own parsers accept, the
7B layouts checked by the trainers' parsers, and the requeue logic with Slurm's commands stubbed."""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dcod.arguments import (
    add_convert_args,
    add_eval_args,
    add_preprocess_args,
    eval_config_from_args,
    preprocess_config_from_args,
)
from megatron_dcod.synthesis.cli import add_synthesis_args, synthesis_config_from_args
from tests.helpers.training import REPO

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
TOOL_PARSERS = {
    "preprocess_traces.py": add_preprocess_args,
    "convert_checkpoint.py": add_convert_args,
    "eval_math.py": add_eval_args,
    "synthesize_traces.py": add_synthesis_args,
}


def run_script(script, **env) -> subprocess.CompletedProcess:
    """`bash slurm/script` as outside Slurm (no SLURM_* variables), with `env` on top."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    return subprocess.run(
        ["bash", str(SLURM / script)],
        cwd=REPO,
        env={**clean, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def printed_tool_commands(stdout: str) -> list[tuple[str, list[str]]]:
    """(tool name, its arguments) of each `[env VAR=...] python tools/X.py ...` line printed."""
    commands = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        while words and (words[0] == "env" or "=" in words[0]):
            words = words[1:]
        if len(words) > 1 and words[1].startswith("tools/"):
            commands.append((words[1].removeprefix("tools/"), words[2:]))
    return commands


def test_every_recipe_is_there():
    names = {script.name for script in SCRIPTS}
    assert {"common.sh", "train_7b.sh", "preprocess.sh", "score_teacher.sh"} <= names
    assert {"convert_hf.sh", "eval.sh", "train_hf_deepspeed.sh", "compare_methods.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed (make test installs Debian's shellcheck)")
        pytest.skip("shellcheck is not installed")
    scripts = [str(script.relative_to(REPO)) for script in SCRIPTS]
    result = subprocess.run(  # -x follows `source` (paths relative to the repository root)
        ["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script, env, expected",
    [
        ("preprocess.sh", {"EXTRA_ARGS": "--skip-bad"}, ["a.jsonl", "b.jsonl", "--skip-bad"]),
        ("convert_hf.sh", {"MODE": "import-hf", "TP": "4"}, ["import-hf", "4"]),
        ("convert_hf.sh", {"MODE": "export-hf", "OUT": "hf-out"}, ["export-hf", "hf-out"]),
        ("eval.sh", {"BENCHMARKS": "gsm8k aime24", "EXTRA_ARGS": "--limit 5"}, ["aime24", "5"]),
        ("synthesize.sh", {"METHOD": "skd", "SHARD": "3", "SHARDS": "8"}, ["skd", "3/8"]),
    ],
)
def test_dry_run_prints_commands_the_tools_accept(tmp_path, script, env, expected):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).touch()
    result = run_script(script, DRY_RUN="1", INPUT=f"{tmp_path}/*.jsonl", **env)
    assert result.returncode == 0, result.stderr
    commands = printed_tool_commands(result.stdout)
    assert commands, result.stdout
    for tool, arguments in commands:
        args = TOOL_PARSERS[tool](argparse.ArgumentParser()).parse_args(arguments)
        if tool == "eval_math.py":
            eval_config_from_args(args)
        if tool == "preprocess_traces.py":
            preprocess_config_from_args(args)
        if tool == "synthesize_traces.py":
            synthesis_config_from_args(args)
    printed = [word for _, arguments in commands for word in arguments]
    assert all(any(value in word for word in printed) for value in expected), printed


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {"role": "teacher", "topk": 8, "tensor_model_parallel_size": 4, "dtype": "bf16"}),
        ({"AS": "ref", "TP": "2", "PP": "2", "OVERWRITE": "1"}, {"role": "ref", "topk": 0}),
    ],
)
def test_score_teacher_dry_run_is_accepted_by_the_scorer(env, expected):
    from megatron_dcod.scoring.arguments import build_parser, config_from_args

    result = run_script("score_teacher.sh", DRY_RUN="1", DATA_PATH="a b", **env)
    assert result.returncode == 0, result.stderr
    (launch,) = result.stdout.strip().splitlines()
    assert launch.startswith("srun --nodes=2 ") and "--nproc_per_node=8 --nnodes=2" in launch
    words = shlex.split(launch)
    config = config_from_args(
        build_parser().parse_args(words[words.index("megatron_dcod.score") + 1 :])
    )
    assert config.data_path == ("a", "b") and config.overwrite == ("OVERWRITE" in env)
    assert all(getattr(config, name) == value for name, value in expected.items()), config


def test_eval_deals_benchmarks_to_gpu_slots():
    result = run_script("eval.sh", DRY_RUN="1", GPUS="4", VLLM_TP="2", BENCHMARKS="a b c")
    devices = [line.split()[1] for line in result.stdout.splitlines()]
    assert devices == ["CUDA_VISIBLE_DEVICES=0\\,1"] * 2 + ["CUDA_VISIBLE_DEVICES=2\\,3"]


def test_convert_refuses_an_unknown_mode():
    result = run_script("convert_hf.sh", DRY_RUN="1", MODE="sideways")
    assert result.returncode != 0 and "MODE must be import-hf or export-hf" in result.stderr


def test_train_dry_run_checks_the_7b_layout_with_the_trainer_parser():
    result = run_script("train_7b.sh", DRY_RUN="1")
    assert result.returncode == 0, result.stderr[-3000:]
    launch, summary = result.stdout.strip().splitlines()
    assert launch.startswith("srun --nodes=8 ") and "--nproc_per_node=8 --nnodes=8" in launch
    assert "-m megatron_dcod.train --hf-config" in launch
    for flags in ("--use-distributed-optimizer", "--fp8-format hybrid", "--seq-length 16384"):
        assert flags in launch
    assert "--exit-signal-handler" in launch
    words = shlex.split(launch)
    assert words[words.index("--save") + 1] == words[words.index("--load") + 1]
    assert summary.startswith("flags OK for 64 processes: TP 2 × PP 1 × DP 32; ")
    assert "global batch 128 = micro 1 × DP 32 × 4 accumulation steps" in summary


@pytest.mark.parametrize(
    "override, message",
    [
        ({"TP": "3"}, "megatron rejects the flags: world size (64) is not divisible"),
        ({"EXTRA_ARGS": "--no-such-flag"}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_train_dry_run_rejects_a_bad_override(override, message):
    result = run_script("train_7b.sh", DRY_RUN="1", **override)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_deepspeed_dry_run_checks_the_zero3_layout_with_the_trainer_parser():
    result = run_script("train_hf_deepspeed.sh", DRY_RUN="1")
    assert result.returncode == 0, result.stderr[-3000:]
    launch, summary = result.stdout.strip().splitlines()
    assert launch.startswith("srun --nodes=2 ") and "--nproc_per_node=8 --nnodes=2" in launch
    assert "-m megatron_dcod.train_hf --hf-model" in launch
    for flags in ("--zero-stage 3", "--gradient-checkpointing", "--bf16", "--seq-length 16384"):
        assert flags in launch
    assert "--exit-signal-handler" in launch and "--dcod-weighting dcod" in launch
    words = shlex.split(launch)
    assert words[words.index("--save") + 1] == words[words.index("--load") + 1]
    assert summary.startswith("flags OK for 16 processes: ZeRO-3 over DP 16; ")
    assert "global batch 128 = micro 1 × DP 16 × 8 accumulation steps" in summary


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"GLOBAL_BATCH": "100"},
            "--global-batch-size 100 is not a multiple of --micro-batch-size 1 × 16",
        ),
        ({"EXTRA_ARGS": "--no-such-flag"}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_deepspeed_dry_run_rejects_a_bad_override(override, message):
    result = run_script("train_hf_deepspeed.sh", DRY_RUN="1", **override)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def write_lab_spec(root: Path) -> Path:
    """A spec tools/compare_methods.py accepts: placeholder models, dataset and eval file (enough
    to list the runs; nothing trains)."""
    for model in ("student", "teacher"):
        (root / model).mkdir()
        (root / model / "config.json").write_text("{}")
    (root / "traces.meta.json").write_text("{}")
    (root / "heldout.jsonl").touch()
    spec = {
        "student": "student",
        "teacher": "teacher",
        "datasets": {"teacher": "traces"},
        "seeds": [1, 2],
        "methods": {"sft": {"flags": ["--dcod-weighting", "sft"]}, "dcod": {}},
        "evals": {"heldout": {"data": "heldout.jsonl"}},
        "drift": {"data": "heldout.jsonl"},
    }
    (root / "lab.json").write_text(json.dumps(spec))
    return root / "lab.json"


def load_compare_methods():
    spec = importlib.util.spec_from_file_location(
        "compare_methods", REPO / "tools/compare_methods.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sbatch_option(words: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in a printed sbatch command."""
    for index, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return words[index + 1]
    raise AssertionError(f"no {name} in {words}")


def lab_arguments(wrap: str) -> list[str]:
    """The tools/compare_methods.py arguments of a job's --wrap command."""
    words = shlex.split(wrap)
    return words[words.index("tools/compare_methods.py") + 1 :]


def test_compare_methods_submits_a_job_per_run_then_the_report(tmp_path, capsys):
    from torch.distributed.run import get_args_parser

    spec, out = write_lab_spec(tmp_path), tmp_path / "lab out"
    tool = load_compare_methods()
    assert tool.main(["--spec", str(spec), "--out", str(out), "--list-runs"]) == 0
    run_ids = capsys.readouterr().out.split()
    assert run_ids[0] == "initial" and len(run_ids) == 5, run_ids

    env = {"SPEC": str(spec), "OUT": str(out), "GPUS_PER_NODE": "4", "PARTITION": "gpu"}
    result = run_script("compare_methods.sh", DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert all(words[0] == "sbatch" for words in commands), result.stdout
    assert all(sbatch_option(words, "--partition") == "gpu" for words in commands)
    *run_jobs, report = commands
    assert [sbatch_option(words, "--job-name") for words in run_jobs] == [
        f"lab-{run_id}" for run_id in run_ids
    ]
    for run_id, words in zip(run_ids, run_jobs):
        gpus = "1" if run_id == "initial" else "4"  # the student before training: eval only
        assert sbatch_option(words, "--gpus-per-node") == gpus and "--dependency" not in words
        wrap = sbatch_option(words, "--wrap")
        assert shlex.split(wrap)[0] == "srun"
        arguments = lab_arguments(wrap)
        assert arguments[arguments.index("--only") + 1] == run_id and "--no-report" in arguments
        # The tool's own parser (a misspelt flag fails here) selects exactly this run.
        assert tool.main([*arguments, "--list-runs"]) == 0
        assert capsys.readouterr().out.split() == [run_id]
        launcher = shlex.split(arguments[arguments.index("--train-launcher") + 1])
        assert launcher[:3] == [sys.executable, "-m", "torch.distributed.run"]
        torchrun = get_args_parser().parse_args([*launcher[3:], "megatron_dcod.train_hf"])
        assert torchrun.module and torchrun.standalone and torchrun.nproc_per_node == "4"

    job_ids = [f"JOB_ID_{index}" for index in range(1, len(run_ids) + 1)]  # the dry run's
    assert sbatch_option(report, "--dependency") == "afterany:" + ":".join(job_ids)
    arguments = lab_arguments(sbatch_option(report, "--wrap"))
    assert "--report-only" in arguments and "--only" not in arguments
    assert tool.main([*arguments, "--list-runs"]) == 0
    assert capsys.readouterr().out.split() == run_ids


def test_compare_methods_submits_only_the_runs_asked_for(tmp_path):
    env = {"SPEC": str(write_lab_spec(tmp_path)), "ONLY": "dcod.seed2 initial"}
    result = run_script("compare_methods.sh", DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    names = [sbatch_option(shlex.split(line), "--job-name") for line in result.stdout.splitlines()]
    assert names == ["lab-initial", "lab-dcod.seed2", "lab-report"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SPEC": ""}, "error: set SPEC to the lab spec"),
        ({"SPEC": "no/such/lab.yaml"}, "error: SPEC=no/such/lab.yaml: no such file"),
        ({"ONLY": "nope.seed1"}, "error: --only: unknown runs ['nope.seed1']"),
    ],
)
def test_compare_methods_refuses_a_missing_spec_or_run(tmp_path, env, message):
    spec = write_lab_spec(tmp_path)
    env = {"SPEC": str(spec), **env} if "ONLY" in env else env
    result = run_script("compare_methods.sh", DRY_RUN="1", **env)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing submitted


REQUEUE_SCENARIO = """
source slurm/common.sh
SLURM_JOB_ID=42
scontrol() { echo "scontrol $*"; }
scancel() { echo "scancel $*"; kill -TERM "${LAUNCH_PID}"; }
status=0
run_supervised bash -c "$TRAINER" || status=$?
finish_or_requeue "${status}" "$SAVE_DIR" 4
"""


@pytest.mark.parametrize("time_limit", [True, False], ids=["time-limit", "crash"])
def test_a_stopped_run_requeues_and_a_crash_does_not(tmp_path, time_limit):
    """The batch shell's USR1 (time limit) becomes a SIGTERM to the trainer, which checkpoints;
    then the job requeues itself. A trainer that fails on its own ends the job with its status."""
    trainer = (  # a stand-in trainer: checkpoints iteration 2 on SIGTERM, or fails at once
        f"trap 'kill $!; echo 2 > {tmp_path}/latest_checkpointed_iteration.txt; exit 1' TERM; "
        "sleep 30 & wait $!"
        if time_limit
        else "exit 3"
    )
    scenario = ("(sleep 0.5; kill -USR1 $$) &" if time_limit else "") + REQUEUE_SCENARIO
    result = subprocess.run(
        ["bash", "-c", scenario],
        cwd=REPO,
        env={**os.environ, "REPO_ROOT": str(REPO), "TRAINER": trainer, "SAVE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    if time_limit:
        assert result.returncode == 0, result.stderr
        assert "scancel --signal=TERM 42\nscontrol requeue 42" in result.stdout
        assert "stopped at iteration 2 of 4: requeueing job 42" in result.stderr
    else:
        assert result.returncode == 3 and "scontrol" not in result.stdout


@pytest.mark.parametrize("latest, requeued", [("iter_0000002", True), ("iter_0000004", False)])
def test_requeue_reads_deepspeeds_latest_file(tmp_path, latest, requeued):
    """Without Megatron's tracker file the iteration is DeepSpeed's `latest` tag (train_hf)."""
    (tmp_path / "latest").write_text(latest)
    scenario = (
        'source slurm/common.sh; SLURM_JOB_ID=42; STOP_REQUESTED=1; scontrol() { echo "$*"; }; '
        'finish_or_requeue 0 "$SAVE_DIR" 4'
    )
    result = subprocess.run(
        ["bash", "-c", scenario],
        cwd=REPO,
        env={**os.environ, "REPO_ROOT": str(REPO), "SAVE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout == "requeue 42\n") == requeued, result.stdout
    if requeued:
        assert "stopped at iteration 2 of 4" in result.stderr
    else:
        assert "last checkpoint: iteration 4" in result.stderr


def test_synthesis_merge_refuses_an_unfinished_part(tmp_path):
    for index in range(2):
        part = tmp_path / f"part-{index}-of-2.jsonl"
        part.write_text(f'{{"prompt_index": {index}}}\n')
        complete = "true" if index == 0 else "false"
        Path(f"{part}.summary.json").write_text(f'{{"complete": {complete}}}')
    result = run_script("synthesize.sh", MODE="merge", SHARDS="2", OUT_DIR=str(tmp_path))
    assert result.returncode != 0 and "part-1-of-2.jsonl is not complete" in result.stderr
    Path(f"{tmp_path}/part-1-of-2.jsonl.summary.json").write_text('{"complete": true}')
    result = run_script("synthesize.sh", MODE="merge", SHARDS="2", OUT_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    merged = (tmp_path / "motab.jsonl").read_text()
    assert merged == '{"prompt_index": 0}\n{"prompt_index": 1}\n'
