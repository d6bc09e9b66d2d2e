"""`python -m megatron_dcod.train` on CPU: split batches, DP, TP and PP compute the same step.

Every run starts from one initial checkpoint (an HF Llama imported by the converter, loaded
with --finetune), trains a few steps on the same sequences with plain SGD (no momentum: each
step moves the weights by −lr · gradient, so a wrong loss scale shows in the weights, which
Adam's first step, sign(g), would hide) and saves. The weight updates (saved − initial, global
tensors of the torch_dist checkpoints) and the logged losses must agree within fp32 tolerance.
"""

import pytest
import torch

from tests.helpers.distributed import run_distributed_test
from tests.helpers.models import import_to_megatron, save_tiny_llama
from tests.helpers.training import checkpoint_tensors, logged_losses, tiny_run_flags, train
from tests.helpers.traces import write_synthetic_traces

STEPS = 3
DCOD = ("--dcod-weighting=dcod", "--dcod-scope=prefix")
SGD = ("--optimizer=sgd", "--sgd-momentum=0", "--lr=1.0")
ULPS = 16
"""fp32 rounding of the weights themselves (an update is a difference of two stored weights)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, traces, HF model dir, its imported Megatron checkpoint: the initial weights)."""
    root = tmp_path_factory.mktemp("equivalence")
    data = write_synthetic_traces(root / "data" / "traces", count=96)
    hf_dir = save_tiny_llama(root / "hf", vocab_size=64)
    run_distributed_test(import_to_megatron, 1, hf_dir=str(hf_dir), out=str(root / "init"))
    return root, data, hf_dir, root / "init"


def run(setup, name, *flags, nproc=1, correction=DCOD, steps=STEPS):
    """(logged lm losses, {name: (weight update, weight after)}) of a run from the initial
    checkpoint."""
    root, data, hf_config, init = setup
    save = root / name
    output = train(
        *tiny_run_flags(hf_config, data, iters=steps),
        *SGD,
        *correction,
        f"--load={init}",
        "--finetune",
        f"--save={save}",
        f"--save-interval={steps}",
        "--global-batch-size=4",
        *flags,
        nproc=nproc,
    )
    initial, trained = checkpoint_tensors(init, None), checkpoint_tensors(save, steps)
    return logged_losses(output), {
        name: (trained[name] - initial[name], trained[name]) for name in trained
    }


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup, "reference", "--micro-batch-size=4")


def assert_same_training(reference, other):
    losses, updates = other
    assert sorted(losses) == sorted(reference[0]) and len(losses) >= 2
    for iteration, loss in reference[0].items():
        assert losses[iteration] == pytest.approx(loss, rel=1e-5)
    assert updates.keys() == reference[1].keys()
    for name, (update, weight) in reference[1].items():
        rounding = ULPS * torch.finfo(torch.float32).eps * float(weight.abs().max())
        atol = max(1e-5 * float(update.abs().max()), rounding)
        torch.testing.assert_close(updates[name][0], update, rtol=1e-4, atol=atol, msg=name)


def test_updates_are_large_and_a_wrong_scale_would_show(setup, reference):
    """The comparison is not vacuous: every tensor moves, the loss moves, and the same updates
    1% larger (a loss denominator off by 1%) fail the comparison."""
    losses, updates = reference
    assert all(update.abs().max() > 0 for update, _ in updates.values())
    assert losses[STEPS] != losses[1]
    scaled = {name: (1.01 * update, weight) for name, (update, weight) in updates.items()}
    with pytest.raises(AssertionError):
        assert_same_training(reference, (losses, scaled))


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


def test_topk_loss_at_tp2_equals_tp1(setup):
    """The logits path at TP=2 (the model returns vocabulary-sharded logits; the top-k loss
    takes a log-softmax over the split vocabulary and gathers the teacher's ids from their
    shards) trains as the unsplit one does. `kl` here; ToDi shares the path and is compared
    shard by shard with the full vocabulary in tests/unit/correction/test_token_losses_tp.py."""
    correction = ("--dcod-weighting=dcod", "--dcod-base-loss=kl")
    single = run(setup, "kl-tp1", "--micro-batch-size=4", correction=correction, steps=2)
    split = run(
        setup, "kl-tp2", "--micro-batch-size=4", "--tensor-model-parallel-size=2",
        nproc=2, correction=correction, steps=2,
    )  # fmt: skip
    assert_same_training(single, split)
