"""A micro-batch whose loss is non-finite neither hangs nor crashes a run, and costs nothing else.

One teacher log-prob of one trace is NaN (written past the format's validation, as a damaged
file would be), so that trace's DCOD weight and loss are NaN. With one trace per micro-batch,
the run must finish and end with the weights of a run in which that trace's tokens are masked
out (on one rank: the same two micro-batches a step) — at DP=2 with overlapped gradient
reduction (each rank's only micro-batch of a step is its last, whose gradient hooks launch the
reduction) and at PP=2 (the previous stage waits for the gradient of every micro-batch). All
runs start from one imported checkpoint and take plain SGD steps (the updates are the
gradients: Adam's first step, sign(g), would turn rounding noise into whole steps).
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
from tests.helpers.distributed import run_distributed_test
from tests.helpers.models import import_to_megatron, save_tiny_llama
from tests.helpers.traces import write_synthetic_traces

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
    hf_dir = save_tiny_llama(root / "hf", vocab_size=64)
    run_distributed_test(import_to_megatron, 1, hf_dir=str(hf_dir), out=str(root / "init"))
    return root, hf_dir, poisoned, masked


def run(datasets, name, data, *flags, nproc=2):
    root, hf_dir, *_ = datasets
    output = train(
        *tiny_run_flags(hf_dir, data, iters=STEPS),
        "--optimizer=sgd", "--sgd-momentum=0", "--lr=0.5",
        "--dcod-weighting=dcod", "--dcod-no-pack", "--micro-batch-size=1",
        "--global-batch-size=2", f"--load={root / 'init'}", "--finetune",
        f"--save={root / name}", f"--save-interval={STEPS}", *flags, nproc=nproc,
    )  # fmt: skip
    return output, checkpoint_tensors(root / name, STEPS)


@pytest.fixture(scope="module")
def masked_run(datasets):
    """The reference: the poisoned trace's tokens masked out, on one rank."""
    return run(datasets, "masked", datasets[3], nproc=1)


@pytest.mark.parametrize(
    "layout",
    [
        ("--overlap-grad-reduce",),
        ("--pipeline-model-parallel-size=2",),
    ],
    ids=["dp2-overlap", "pp2"],
)
def test_dropped_microbatch_equals_masked_tokens(datasets, masked_run, layout):
    poisoned = datasets[2]
    name = "pp2" if "--pipeline-model-parallel-size=2" in layout else "dp2"
    poisoned_output, poisoned_weights = run(datasets, f"{name}-poisoned", poisoned, *layout)
    masked_output, masked_weights = masked_run
    dropped = sum(
        m["dropped_microbatches"] for m in logged_weight_metrics(poisoned_output).values()
    )
    assert dropped == 1  # the one poisoned trace, once in the epoch
    assert all(
        m["dropped_microbatches"] == 0 for m in logged_weight_metrics(masked_output).values()
    )
    losses = logged_losses(poisoned_output)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    assert losses == pytest.approx(logged_losses(masked_output), rel=1e-5)
    assert poisoned_weights.keys() == masked_weights.keys()
    for key, tensor in masked_weights.items():
        torch.testing.assert_close(poisoned_weights[key], tensor, rtol=1e-5, atol=1e-8, msg=key)
