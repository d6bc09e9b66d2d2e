"""A micro-batch whose loss is non-finite neither hangs nor crashes a run, and costs nothing else.

One teacher log-prob of one trace is NaN (written past the format's validation, as a damaged
file would be), so that trace's DCOD weight and loss are NaN. With one trace per micro-batch,
the run must finish and end with the weights of a run in which that trace's tokens are masked
out — at DP=2 with the distributed optimizer and overlapped gradient reduction (each rank's
only micro-batch of a step is its last, whose gradient hooks launch the reduction) and at PP=2
(the previous stage waits for the gradient of every micro-batch).
"""

import shutil

import numpy as np
import pytest
import torch

from megatron_dcod.data.trace_format import TraceDataset, array_path_prefix, dataset_files
from tests.helpers.training import (
    checkpoint_tensors,
    logged_losses,
    logged_weight_metrics,
    tiny_run_flags,
    train,
)
from tests.helpers.traces import save_hf_config, write_synthetic_traces

BAD_TRACE, STEPS = 2, 2


def copy_dataset(source, target):
    for original, copy in zip(dataset_files(source), dataset_files(target)):
        if original.exists():
            shutil.copyfile(original, copy)
    return target


def overwrite_trace(prefix, name: str, dtype, change) -> None:
    """Apply `change` to BAD_TRACE's values of one array file, in place."""
    dataset = TraceDataset(prefix)
    lengths = dataset.lengths.astype(np.int64)
    start = int(lengths[:BAD_TRACE].sum())
    values = np.memmap(array_path_prefix(prefix, name) + ".bin", dtype, "r+")
    change(values[start : start + lengths[BAD_TRACE]])
    values.flush()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("non-finite")
    clean = write_synthetic_traces(root / "clean", count=STEPS * 2, lengths=(8, 20))
    poisoned = copy_dataset(clean, root / "poisoned")
    overwrite_trace(poisoned, "teacher_logprobs", np.float32, lambda v: v.__setitem__(4, np.nan))
    masked = copy_dataset(clean, root / "masked")
    overwrite_trace(masked, "loss_mask", np.uint8, lambda v: v.__setitem__(slice(None), 0))
    return root, save_hf_config(root / "hf"), poisoned, masked


def run(datasets, name, data, *flags):
    root, hf_config, *_ = datasets
    output = train(
        *tiny_run_flags(hf_config, data, iters=STEPS),
        "--dcod-weighting=dcod", "--dcod-no-pack", "--micro-batch-size=1",
        "--global-batch-size=2", f"--save={root / name}", f"--save-interval={STEPS}",
        *flags, nproc=2,
    )  # fmt: skip
    return output, checkpoint_tensors(root / name, STEPS)


@pytest.mark.parametrize(
    "layout",
    [
        ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"),
        ("--pipeline-model-parallel-size=2",),
    ],
    ids=["dp2-overlap", "pp2"],
)
def test_dropped_microbatch_equals_masked_tokens(datasets, layout):
    root, hf_config, poisoned, masked = datasets
    name = "pp2" if "--pipeline-model-parallel-size=2" in layout else "dp2"
    poisoned_output, poisoned_weights = run(datasets, f"{name}-poisoned", poisoned, *layout)
    masked_output, masked_weights = run(datasets, f"{name}-masked", masked, *layout)
    dropped = sum(
        m["dropped_microbatches"] for m in logged_weight_metrics(poisoned_output).values()
    )
    assert dropped == 1  # the one poisoned trace, once in the epoch
    assert all(
        m["dropped_microbatches"] == 0 for m in logged_weight_metrics(masked_output).values()
    )
    losses = logged_losses(poisoned_output)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    assert losses == pytest.approx(logged_losses(masked_output), rel=1e-6)
    assert poisoned_weights.keys() == masked_weights.keys()
    for key, tensor in masked_weights.items():
        torch.testing.assert_close(poisoned_weights[key], tensor, rtol=1e-6, atol=0, msg=key)
