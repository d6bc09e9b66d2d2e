"""One training step of `python -m megatron_dcod.train` against a float64 reference.

An HF Llama is imported as the initial checkpoint; the trainer takes one plain-SGD step on a
global batch that holds every trace of a tiny dataset exactly once (one trace per row), split
over 2 data-parallel ranks × 2 accumulated micro-batches, and the step is exported back to HF.
The reference is plain HF transformers in float64 with the DCOD weights written out per token: L = Σ m w ℓ / Σ m w (`--dcod-normalization weights`), and SGD
moves every weight by −lr · ∂L/∂θ. The trainer's update must equal it, and must not equal the
update of the `tokens` normalization (L = Σ m w ℓ / Σ m) — the two differ by a constant factor
per step, which is exactly what a wrong denominator looks like. The normalizer Σ m w is the
step's, summed over micro-batches and ranks: a per-rank or per-micro-batch sum would not match.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dcod.config import ExportConfig
from tests.helpers.distributed import run_distributed_test
from tests.helpers.models import import_to_megatron, save_tiny_llama
from tests.helpers.reference import LR, OFFSET, SCALE, TEMPERATURE, TRACES, reference_updates
from tests.helpers.training import tiny_run_flags, train
from tests.helpers.traces import write_synthetic_traces


def export_checkpoint(checkpoint: str, template: str, out: str) -> None:
    from megatron_dcod.checkpoint.export_hf import export_hf

    export_hf(ExportConfig(Path(checkpoint), Path(template), Path(out), dtype="fp32"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(HF init dir, dataset prefix, {HF name: trainer's update}) of one `weights` step."""
    root = tmp_path_factory.mktemp("reference")
    hf_dir = save_tiny_llama(root / "hf", vocab_size=64)
    prefix = write_synthetic_traces(root / "traces", count=TRACES, vocab=64, lengths=(6, 24))
    run_distributed_test(import_to_megatron, 1, hf_dir=str(hf_dir), out=str(root / "init"))
    train(
        *tiny_run_flags(hf_dir, prefix, iters=1),
        "--optimizer=sgd", "--sgd-momentum=0", f"--lr={LR}",
        "--dcod-weighting=dcod", "--dcod-normalization=weights", "--dcod-no-pack",
        f"--dcod-scale={SCALE}", f"--dcod-offset={OFFSET}", f"--dcod-temperature={TEMPERATURE}",
        f"--micro-batch-size={TRACES // 4}", f"--global-batch-size={TRACES}",
        f"--load={root / 'init'}", "--finetune", f"--save={root / 'run'}", "--save-interval=1",
        nproc=2,
    )  # fmt: skip
    run_distributed_test(
        export_checkpoint, 1, checkpoint=str(root / "run"), template=str(hf_dir),
        out=str(root / "run-hf"),
    )  # fmt: skip
    before = load_file(hf_dir / "model.safetensors")
    after = load_file(root / "run-hf" / "model.safetensors")
    return hf_dir, prefix, {name: after[name].double() - before[name].double() for name in after}


def test_weights_normalization_step_equals_the_float64_reference(trained):
    hf_dir, prefix, updates = trained
    expected = reference_updates(hf_dir, prefix, "weights")
    assert updates.keys() == expected.keys()
    for name, update in expected.items():
        scale = float(update.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(updates[name], update, rtol=2e-3, atol=2e-4 * scale, msg=name)


def test_and_differs_from_the_tokens_normalization(trained):
    hf_dir, prefix, updates = trained
    tokens = reference_updates(hf_dir, prefix, "tokens")
    ratios = [
        float(updates[name].norm() / tokens[name].norm()) for name in tokens if tokens[name].any()
    ]
    # Σ m w ≠ Σ m here (w mean ≈ 0.6), so every tensor's update is a clear factor off
    assert all(abs(ratio - 1) > 0.1 for ratio in ratios), ratios
