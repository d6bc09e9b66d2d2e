"""Resume is exact: 6 steps straight == 3 steps, save, load, 3 steps — bit for bit.

Weights and Adam moments after step 6 and the weight diagnostics of steps 4–6 (which depend on
the student's log-probs) are compared with equality, at DP=2
with the distributed optimizer, at TP=2 and at PP=2.
"""

import pytest
import torch

from tests.helpers.training import (
    checkpoint_tensors,
    logged_losses,
    logged_weight_metrics,
    tiny_run_flags,
    train,
)
from tests.helpers.traces import save_hf_config, write_synthetic_traces

CONFIGS = {
    "dp2-distributed-optimizer": ["--micro-batch-size=1", "--use-distributed-optimizer"],
    "tp2": ["--micro-batch-size=2", "--tensor-model-parallel-size=2"],
    "pp2": ["--micro-batch-size=1", "--pipeline-model-parallel-size=2"],
}


CONFIGS_IN_CI = "dp2-distributed-optimizer"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return write_synthetic_traces(root / "data" / "traces", count=96), save_hf_config(root / "hf")


# tp2 and pp2 are `heavy` (make test-heavy) to keep `make test` in the CI budget; TP=2 and PP=2
# training stay in the default suite (test_train_equivalence.py), resume at DP=2 with the
# distributed optimizer (sharded optimizer state) too.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.heavy] if name != CONFIGS_IN_CI else [])
        for name in CONFIGS
    ],
)
def test_resume_is_bit_exact(inputs, tmp_path, name):
    data, hf_config = inputs
    common = [
        *tiny_run_flags(hf_config, data, iters=6),
        "--dcod-weighting=dcod",
        "--global-batch-size=4",
        "--save-interval=3",
        *CONFIGS[name],
    ]
    straight = train(*common, f"--save={tmp_path / 'straight'}", nproc=2)
    resumed = train(
        *common,
        f"--load={tmp_path / 'straight'}",
        "--ckpt-step=3",
        f"--save={tmp_path / 'resumed'}",
        nproc=2,
    )
    assert sorted(logged_losses(resumed)) == [4, 5, 6]  # it resumed after step 3
    # per-iteration diagnostics (Megatron's own loss line averages steps 4 and 5 after a resume)
    metrics = logged_weight_metrics(straight)
    assert {it: metrics[it] for it in (4, 5, 6)} == logged_weight_metrics(resumed)
    # The distributed optimizer saves flat buckets whose padding is uninitialized memory, so
    # there only the weights are compared: they are bit-equal after 3 resumed steps only if
    # the restored Adam moments were.
    with_optimizer = "distributed-optimizer" not in name
    expected = checkpoint_tensors(tmp_path / "straight", 6, optimizer=with_optimizer)
    actual = checkpoint_tensors(tmp_path / "resumed", 6, optimizer=with_optimizer)
    assert actual.keys() == expected.keys()
    assert with_optimizer == any(key.startswith("optimizer") for key in expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key
