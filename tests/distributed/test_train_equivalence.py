"""`python -m megatron_dcod.train` on CPU: split batches, DP, TP and PP compute the same step.

Every run starts from one initial checkpoint (TP=1, PP=1) loaded with --finetune, trains 3 DCOD
steps on the same 12 sequences and saves; the saved weights (global tensors of the torch_dist
checkpoint) and the logged losses must agree within fp32 tolerance.
"""

import pytest
import torch

from tests.helpers.training import checkpoint_tensors, logged_losses, tiny_run_flags, train
from tests.helpers.traces import save_hf_config, write_synthetic_traces

STEPS = 3
DCOD = ["--dcod-weighting=dcod", "--dcod-scope=prefix"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    data = write_synthetic_traces(root / "data" / "traces", count=96)
    hf_config = save_hf_config(root / "hf")
    init = root / "init"
    train(  # one step at lr 0: the initial weights, saved
        *tiny_run_flags(hf_config, data, iters=1),
        "--lr=0", "--micro-batch-size=4", "--global-batch-size=4",
        f"--save={init}", "--save-interval=1",
    )  # fmt: skip
    return root, data, hf_config, init


def run(setup, name, *flags, nproc=1):
    root, data, hf_config, init = setup
    save = root / name
    output = train(
        *tiny_run_flags(hf_config, data, iters=STEPS),
        *DCOD,
        f"--load={init}",
        "--finetune",
        f"--save={save}",
        f"--save-interval={STEPS}",
        "--global-batch-size=4",
        *flags,
        nproc=nproc,
    )
    return logged_losses(output), checkpoint_tensors(save, STEPS)


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup, "reference", "--micro-batch-size=4")


def assert_same_training(reference, other):
    losses, weights = other
    assert sorted(losses) == list(range(1, STEPS + 1))
    for iteration, loss in reference[0].items():
        assert losses[iteration] == pytest.approx(loss, rel=1e-5)
    assert weights.keys() == reference[1].keys()
    for name, tensor in reference[1].items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_weights_moved(setup, reference):
    """The comparison is not vacuous: 3 steps change the weights and the loss."""
    init = checkpoint_tensors(setup[3], 1)
    moved = [name for name, tensor in reference[1].items() if not torch.equal(tensor, init[name])]
    assert len(moved) == len(init)
    assert reference[0][STEPS] != reference[0][1]


def test_accumulation_equals_one_big_micro_batch(setup, reference):
    assert_same_training(reference, run(setup, "accumulate", "--micro-batch-size=1"))


def test_dp2_equals_dp1(setup, reference):
    assert_same_training(reference, run(setup, "dp2", "--micro-batch-size=2", nproc=2))


def test_tp2_equals_tp1(setup, reference):
    flags = ("--micro-batch-size=4", "--tensor-model-parallel-size=2")
    assert_same_training(reference, run(setup, "tp2", *flags, nproc=2))


def test_pp2_equals_pp1(setup, reference):
    flags = ("--micro-batch-size=1", "--pipeline-model-parallel-size=2")
    assert_same_training(reference, run(setup, "pp2", *flags, nproc=2))


def test_weight_normalization_is_global(setup):
    """--dcod-normalization weights: the step's Σ m·w reaches Megatron's gradient scaling
    through the finalize hook under DP=2 and accumulation alike (the hand-off itself is
    checked in tests/unit/training/test_step.py)."""
    weights = ("--dcod-normalization=weights",)
    reference = run(setup, "weights-reference", "--micro-batch-size=4", *weights)
    other = run(setup, "weights-dp2", "--micro-batch-size=1", *weights, nproc=2)
    assert_same_training(reference, other)
