"""Megatron's command line: built from --hf-config, parsed once, --help, nothing left changed."""

import os
import subprocess
import sys

import pytest

from megatron_dcod.megatron import argv, patches
from megatron_dcod.megatron.argv import CPU_FLAGS, UNFUSED_FLAGS, megatron_argv
from tests.helpers.training import REPO
from tests.helpers.traces import save_hf_config


def test_user_flags_come_last(tmp_path):
    hf_config = save_hf_config(tmp_path / "hf")
    full = megatron_argv([f"--hf-config={hf_config}", "--num-layers=1"], cpu=True)
    assert full.index("--num-layers=2") < full.index("--num-layers=1")  # argparse: last wins
    assert "--calculate-per-token-loss" in full and set(CPU_FLAGS) <= set(full)
    gpu = set(megatron_argv([f"--hf-config={hf_config}"], cpu=False))
    assert "--distributed-backend=gloo" not in gpu and "--use-cpu-initialization" not in gpu
    assert set(UNFUSED_FLAGS) <= gpu or argv.fused_kernels_available()
    assert megatron_argv(["--help"], cpu=False)[-1] == "--help"  # no --hf-config needed


def test_one_parse_restores_argv_and_environment(tmp_path):
    hf_config = save_hf_config(tmp_path / "hf")
    flags = [f"--hf-config={hf_config}", "--tensor-model-parallel-size=2", "--seq-length=32"]
    flags += ["--micro-batch-size=1", "--dcod-weighting=dcod"]
    with patches.applied(patches.LIBRARY):
        import megatron.training.arguments  # noqa: F401  (its import sets variables of its own)

        argv_before, environment_before = list(sys.argv), dict(os.environ)
        args = argv.parse(flags, cpu=True, world_size=4, quiet=True)
        with pytest.raises(SystemExit, match="megatron rejects the flags: .*divisible"):
            argv.parse([*flags, "--tensor-model-parallel-size=3"], cpu=True, world_size=4)
        bare_assert = r"rejects the flags: assert args.save_interval is not None \(arguments.py:"
        with pytest.raises(SystemExit, match=bare_assert):  # a check without a message
            argv.parse([*flags, "--save=/tmp/x"], cpu=True, world_size=4, quiet=True)
    assert args.world_size == 4 and args.data_parallel_size == 2 and args.num_layers == 2
    assert args.dcod_weighting == "dcod" and args.calculate_per_token_loss
    assert sys.argv == argv_before and dict(os.environ) == environment_before


def test_escape_help_doubles_only_bare_percent_signs():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--a", default=3, help="10% of it, 90%% kept, default %(default)s")
    argv.escape_help(parser)
    assert "10% of it, 90% kept, default 3" in " ".join(parser.format_help().split())


def test_train_help_exits_0_with_the_dcod_flags():
    """`python -m megatron_dcod.train --help`, without --hf-config (megatron-core 0.19.2 has a
    help text with a bare "%", which argparse cannot format)."""
    result = subprocess.run(
        [sys.executable, "-m", "megatron_dcod.train", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "megatron-dcod correction" in result.stdout and "--dcod-weighting" in result.stdout
    assert "--tensor-model-parallel-size" in result.stdout  # Megatron's own flags too


def test_help_with_an_hf_config(tmp_path, capsys):
    """With --hf-config the architecture flags come first; --help still prints and exits 0."""
    hf_config = save_hf_config(tmp_path / "hf")
    with patches.applied(patches.LIBRARY), pytest.raises(SystemExit) as exit_info:
        argv.parse([f"--hf-config={hf_config}", "--help"], cpu=True)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "megatron-dcod correction" in printed and "--dcod-topk-mode" in printed
