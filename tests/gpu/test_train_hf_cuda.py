"""The DeepSpeed engine on a GPU: NCCL, bf16 with fp32 master weights, ZeRO-2 and ZeRO-3, and
the chunked output layer against the model's own logits in bf16 (`check_head` at start-up).
The bf16 run must follow the fp32 run of the same data within bf16 precision."""

import pytest
import torch

from tests.helpers.models import save_tiny_student, tokenizer_fingerprint
from tests.helpers.train_hf_runs import launch
from tests.helpers.training import logged_losses
from tests.helpers.traces import write_synthetic_traces

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_zero2_and_zero3_follow_fp32(tmp_path):
    model = save_tiny_student(tmp_path / "model")
    fingerprint = tokenizer_fingerprint(model)
    traces = write_synthetic_traces(
        tmp_path / "traces", count=64, vocab=fingerprint["vocab_size"], lengths=(8, 60),
        fingerprint=fingerprint,
    )  # fmt: skip
    flags = [
        f"--hf-model={model}", f"--data-path={traces}", "--split=100,0,0", "--seq-length=128",
        "--micro-batch-size=2", "--global-batch-size=4", "--train-iters=10", "--lr=1e-2",
        "--lr-decay-style=constant", "--log-interval=1", "--num-workers=0",
        "--dcod-weighting=dcod", "--dcod-offset=-5",
    ]  # fmt: skip
    logs = launch(
        {
            "fp32": flags + ["--zero-stage=2"],
            "bf16-zero2": flags + ["--zero-stage=2", "--bf16"],
            "bf16-zero3": flags + ["--zero-stage=3", "--bf16", "--gradient-checkpointing"],
        },
        tmp_path,
        nproc=min(2, torch.cuda.device_count()),
    )
    reference = logged_losses(logs["fp32"])
    assert reference[10] < reference[1]  # it learns
    for run in ("bf16-zero2", "bf16-zero3"):
        losses = logged_losses(logs[run])
        assert losses.keys() == reference.keys()
        for iteration, loss in reference.items():
            assert losses[iteration] == pytest.approx(loss, rel=0.05), (run, iteration)
