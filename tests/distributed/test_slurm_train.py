"""slurm/train_7b.sh for real on CPU, outside Slurm (its local torchrun fallback): the tiny
preset at TP=2 on 2 processes, stopped after 2 of 4 steps as a time limit would stop it, then
the same command again, as the requeued job runs it: it resumes from the checkpoint."""

import os
import subprocess
import sys

from tests.helpers.training import REPO, logged_losses
from tests.helpers.traces import write_synthetic_traces


def run_train_script(tmp_path, **env) -> str:
    """`bash slurm/train_7b.sh` with CPU-sized settings; its output, asserting success."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    settings = {
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "NNODES": "1", "GPUS_PER_NODE": "2", "TP": "2", "PP": "1",
        "FP8": "0", "PRECISION": "fp32", "SEQUENCE_PARALLEL": "0",  # need Transformer Engine
        "HF_CONFIG": str(REPO / "examples" / "presets" / "tiny-llama"),
        "DATA_PATH": str(tmp_path / "traces"), "SPLIT": "100,0,0", "RUN_DIR": str(tmp_path / "run"),
        "SEQ_LENGTH": "32", "MICRO_BATCH": "2", "GLOBAL_BATCH": "2", "TRAIN_ITERS": "4",
        "WARMUP_ITERS": "1", "SAVE_INTERVAL": "2", "LOG_INTERVAL": "1", "EVAL_ITERS": "0",
    }  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "train_7b.sh")],
        cwd=REPO,
        env={**clean, **settings, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def test_train_script_runs_and_resumes_on_cpu(tmp_path):
    write_synthetic_traces(tmp_path / "traces", count=32)  # ids < 64 ≤ the preset's 512
    checkpoints = tmp_path / "run" / "checkpoints"
    tracker = checkpoints / "latest_checkpointed_iteration.txt"

    first = run_train_script(tmp_path, EXTRA_ARGS="--exit-interval 2")  # stopped at step 2
    assert "--nproc_per_node=2 --standalone -m megatron_dcod.train" in first
    assert sorted(logged_losses(first)) == [1, 2]
    assert tracker.read_text().strip() == "2"
    assert "last checkpoint: iteration 2" in first

    second = run_train_script(tmp_path)  # the same job again, as after a requeue
    assert f"loading distributed checkpoint from {checkpoints} at iteration 2" in second
    assert sorted(logged_losses(second)) == [3, 4]
    assert tracker.read_text().strip() == "4"
    assert (checkpoints / "dcod_config.json").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
