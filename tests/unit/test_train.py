"""`python -m megatron_dcod.train` end to end on CPU: learning, logs, config, errors, SIGTERM."""

import json
import os
from argparse import Namespace
import signal
import subprocess
import sys

import numpy as np
import pytest

from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter
from megatron_dcod.training.preflight import check_fp8
from tests.helpers.distributed import free_port
from tests.helpers.training import (
    REPO,
    checkpoint_tensors,
    logged_losses,
    logged_weight_metrics,
    tiny_run_flags,
    train,
)
from tests.helpers.traces import FINGERPRINT, save_hf_config, write_synthetic_traces


def test_tiny_model_learns_and_logs(tmp_path):
    data = write_synthetic_traces(tmp_path / "traces", count=200)
    hf_config = save_hf_config(tmp_path / "hf")
    output = train(
        *tiny_run_flags(hf_config, data, iters=100),
        "--dcod-weighting=dcod",
        "--micro-batch-size=4",
        "--global-batch-size=8",
        "--log-interval=10",
        "--lr=3e-3",
        f"--save={tmp_path / 'ckpt'}",
        "--save-interval=100",
        f"--tensorboard-dir={tmp_path / 'tb'}",
    )
    losses = logged_losses(output, "base loss")  # unweighted CE: DCOD's w grows as it learns
    assert sorted(losses) == [1, *range(10, 101, 10)]  # Megatron also logs the first step
    assert losses[100] < 0.3 * losses[1], losses  # the progressions are learnable
    metrics = logged_weight_metrics(output)
    assert sorted(metrics) == list(range(10, 101, 10))
    assert metrics[100]["delta mean"] > metrics[10]["delta mean"]  # the student nears the teacher
    assert 0 < metrics[100]["w ess"] <= 1 and 0 < metrics[100]["w mean"] < 2
    resolved = json.loads((tmp_path / "ckpt" / "dcod_config.json").read_text())
    assert resolved["correction"]["weighting"] == "dcod"
    assert resolved["megatron"]["num_layers"] == 2 and resolved["data"]["pack"] is True
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and b"dcod/w ess" in events[0].read_bytes()


def write_bare_traces(prefix):
    """Traces without teacher arrays, with sources: 4 prompt, 4 student, 1 inserted, 3 teacher."""
    rng = np.random.default_rng(0)
    source = np.r_[np.zeros(4), np.ones(4), [3], np.full(3, 2)].astype(np.uint8)
    with TraceDatasetWriter(prefix, ("tokens", "loss_mask", "source")) as writer:
        for _ in range(16):
            tokens = rng.integers(0, 64, 12).astype(np.int32)
            writer.add(Trace(tokens, (source > 0).astype(np.uint8), source=source))
        writer.commit({"tokenizer": FINGERPRINT})
    return prefix


def test_missing_array_fails_before_step_1(tmp_path):
    """... and the source array reaches the loss: per-source metrics, --dcod-train-sources."""
    data = write_bare_traces(tmp_path / "bare")
    hf_config = save_hf_config(tmp_path / "hf")
    flags = tiny_run_flags(hf_config, data, iters=2)
    output = train(*flags, "--dcod-weighting=dcod", "--micro-batch-size=1", check=False)
    assert "the correction needs ['teacher_logprobs']" in output and str(data) in output
    assert not logged_losses(output)
    sft = train(  # SFT needs no teacher array
        *flags, "--micro-batch-size=1", "--global-batch-size=2", "--dcod-train-sources=teacher"
    )
    assert sorted(logged_losses(sft)) == [1, 2]
    metrics = logged_weight_metrics(sft)[2]
    assert np.isnan(metrics["base loss student"]) and np.isnan(metrics["w mean inserted"])
    assert metrics["w mean teacher"] == 1.0 and metrics["base loss teacher"] > 0


def test_sigterm_saves_a_checkpoint(tmp_path):
    data = write_synthetic_traces(tmp_path / "traces", count=64)
    hf_config = save_hf_config(tmp_path / "hf")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        f"--master_port={free_port()}", "-m", "megatron_dcod.train",
        *tiny_run_flags(hf_config, data, iters=100000), "--micro-batch-size=2",
        "--exit-signal-handler", f"--save={tmp_path / 'ckpt'}", "--save-interval=100000",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "iteration        3/" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    process.wait(timeout=120)
    saved = (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip()
    assert int(saved) >= 3, "".join(lines[-30:])


def test_fp8_without_transformer_engine_is_refused():
    with pytest.raises(SystemExit, match="--fp8-format hybrid needs Transformer Engine"):
        check_fp8(Namespace(fp8="hybrid", transformer_impl="transformer_engine"))
    assert check_fp8(Namespace(fp8=None, transformer_impl="local")) is False


@pytest.mark.parametrize(
    "family, overrides, expected, absent",
    [
        ("qwen2", {}, "self_attention.linear_qkv.bias", "q_layernorm"),
        ("qwen3", {"head_dim": 16, "tie_word_embeddings": True}, "q_layernorm", "output_layer"),
    ],
)
def test_family_checkpoints(tmp_path, family, overrides, expected, absent):
    """Qwen2 trains with q/k/v biases, Qwen3 with q/k RMSNorm and tied embeddings (kl loss)."""
    data = write_synthetic_traces(tmp_path / "traces", count=32)
    hf_config = save_hf_config(tmp_path / "hf", family, **overrides)
    train(
        *tiny_run_flags(hf_config, data, iters=2),
        "--dcod-weighting=dcod",
        "--dcod-base-loss=kl",
        "--micro-batch-size=2",
        f"--save={tmp_path / 'ckpt'}",
        "--save-interval=2",
    )
    names = checkpoint_tensors(tmp_path / "ckpt", 2)
    assert any(expected in name for name in names)
    assert not any(absent in name for name in names)
