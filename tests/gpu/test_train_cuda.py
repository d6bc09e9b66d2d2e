"""Training on one CUDA GPU (NCCL, bf16, distributed optimizer): learns, checkpoints and resumes
bit-exactly (skipped without CUDA)."""

import pytest
import torch

from tests.helpers.training import checkpoint_tensors, logged_losses, tiny_run_flags, train
from tests.helpers.traces import save_hf_config, write_synthetic_traces

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_training_resumes_exactly(tmp_path):
    data = write_synthetic_traces(tmp_path / "traces", count=200)
    hf_config = save_hf_config(tmp_path / "hf", "qwen3", head_dim=16)
    common = [
        *tiny_run_flags(hf_config, data, iters=40),
        "--bf16", "--use-distributed-optimizer", "--dcod-weighting=dcod",
        "--micro-batch-size=4", "--global-batch-size=8", "--save-interval=20",
    ]  # fmt: skip
    straight = train(*common, f"--save={tmp_path / 'straight'}")
    losses = logged_losses(straight, "base loss")
    assert losses[40] < 0.75 * losses[1]  # 4.17 → 2.59 seen on an H100
    train(*common, f"--load={tmp_path / 'straight'}", "--ckpt-step=20", f"--save={tmp_path / 'b'}")
    expected, actual = checkpoint_tensors(tmp_path / "straight", 40), checkpoint_tensors(
        tmp_path / "b", 40
    )
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_topk_loss_weight_normalization_and_a_dropped_micro_batch(tmp_path):
    """The GPU side of the paths the CPU suite covers: packed THD batches whose cu_seqlens are
    built on the host, int32 / float16 top-k arrays copied to the device, the weights finalize
    hook under NCCL, and a micro-batch dropped for a NaN teacher log-prob."""
    import numpy as np

    from megatron_dcod.data.trace_format import TraceDataset, array_path_prefix
    from tests.helpers.training import logged_weight_metrics

    data = write_synthetic_traces(tmp_path / "traces", count=64)
    start = int(TraceDataset(data).lengths[:5].astype(np.int64).sum())
    values = np.memmap(array_path_prefix(data, "teacher_logprobs") + ".bin", np.float32, "r+")
    values[start + 2] = np.nan  # trace 5, a supervised position, past the format's validation
    values.flush()
    output = train(
        *tiny_run_flags(save_hf_config(tmp_path / "hf"), data, iters=8),
        "--bf16", "--dcod-weighting=dcod", "--dcod-base-loss=todi",
        "--dcod-normalization=weights", "--micro-batch-size=2", "--global-batch-size=8",
    )  # fmt: skip
    losses = logged_losses(output)
    assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(list(losses.values())))
    metrics = logged_weight_metrics(output)
    assert sum(m["dropped_microbatches"] for m in metrics.values()) >= 1  # once per epoch
