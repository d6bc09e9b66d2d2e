"""python -m megatron_dcod.train_hf under torchrun on CPU (DeepSpeed's CPU accelerator, gloo).

All runs train the same tiny Llama on the same trace dataset with plain SGD in fp32, so every
update is −lr · ∇L and a wrong gradient scale shows in the weights:
- ZeRO-2 and ZeRO-3, DP=2 and DP=1, micro-batches 1×4 and 4×1: the same losses and weights;
- the Megatron engine (the independent engine: Megatron-Core's GPTModel, THD packed attention,
  its own loss reduction) on the same data, seed and order gives the same per-step `lm loss`
  and, exported to HF, the same weights as this engine's HF save;
- one step of `--dcod-normalization weights` over 2 ranks × 2 micro-batches equals the float64
  reference (plain HF transformers with the DCOD weights written out);
- 6 steps of Adam with warm-up and cosine decay equal 3 steps + save + load + 3, bit for bit, at
  ZeRO-3 DP=2.
Runs of one world size share a launch (tests/helpers/train_hf_runs.py).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dcod.config import ExportConfig
from tests.helpers.distributed import run_distributed_test
from tests.helpers.models import import_to_megatron, save_tiny_student, tokenizer_fingerprint
from tests.helpers.reference import LR, OFFSET, SCALE, TEMPERATURE, TRACES, reference_updates
from tests.helpers.train_hf_runs import launch
from tests.helpers.training import logged_losses, tiny_run_flags, train
from tests.helpers.traces import write_synthetic_traces

ITERS, SGD_LR = 3, 0.5
COMMON = ["--split=100,0,0", "--seq-length=32", "--log-interval=1", "--eval-interval=100000",
          "--eval-iters=0", "--seed=1234", "--num-workers=0", "--weight-decay=0"]  # fmt: skip
SGD = [
    "--optimizer=sgd",
    "--sgd-momentum=0",
    f"--lr={SGD_LR}",
    "--lr-decay-style=constant",
    "--clip-grad=0",
    "--dcod-weighting=dcod",
    "--dcod-scope=prefix",
    "--dcod-offset=-5",
]
# (b = −5: the random student has Δ ≈ −5, so w ≈ 1 and varies by token; b = 0 would give w ≈ 0.01)
ADAM = ["--optimizer=adam", "--lr=1e-2", "--min-lr=1e-3", "--lr-decay-style=cosine",
        "--lr-warmup-iters=2", "--clip-grad=1.0", "--dcod-weighting=dcod"]  # fmt: skip
SPLITS = {  # run → (ZeRO stage, micro-batch size, processes, more flags); global batch 4
    "zero2-micro4": (2, 4, 1, []),
    "zero2-micro1x4": (2, 1, 1, []),
    "zero3-micro4": (3, 4, 1, []),
    "zero3-micro1x4": (3, 1, 1, []),
    "zero2-dp2": (2, 1, 2, []),
    "zero3-dp2": (3, 1, 2, []),
    # the output layer in 8-token chunks (4 per row) and recomputed decoder layers
    "zero3-dp2-chunked": (3, 1, 2, ["--logits-chunk-tokens=8", "--gradient-checkpointing"]),
}


def export_megatron(checkpoint: str, template: str, out: str) -> None:
    from megatron_dcod.checkpoint.export_hf import export_hf

    export_hf(ExportConfig(Path(checkpoint), Path(template), Path(out), dtype="fp32"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, {run: log}) of every DeepSpeed-engine run of this module, in two launches."""
    root = tmp_path_factory.mktemp("train_hf")
    model = save_tiny_student(root / "model")
    fingerprint = tokenizer_fingerprint(model)
    vocab = fingerprint["vocab_size"]
    traces = write_synthetic_traces(
        root / "traces", count=32, vocab=vocab, lengths=(6, 24), fingerprint=fingerprint
    )
    write_synthetic_traces(
        root / "step", count=TRACES, vocab=vocab, lengths=(6, 24), fingerprint=fingerprint
    )
    data = [f"--hf-model={model}", f"--data-path={traces}", *COMMON]
    commands = {1: {}, 2: {}}
    for name, (stage, micro, nproc, more) in SPLITS.items():
        commands[nproc][name] = data + SGD + more + [
            f"--train-iters={ITERS}", f"--zero-stage={stage}", f"--micro-batch-size={micro}",
            "--global-batch-size=4", f"--save-hf={root / 'out' / name}",
        ]  # fmt: skip
    resume = data + ADAM + ["--zero-stage=3", "--micro-batch-size=1", "--global-batch-size=4"]
    commands[2]["resume-reference"] = resume + [
        "--train-iters=6",
        f"--save-hf={root / 'out' / 'resume-reference'}",
    ]
    save = f"--save={root / 'resumed'}"
    commands[2]["resume-first"] = resume + ["--train-iters=6", "--exit-interval=3", save]
    commands[2]["resume-second"] = resume + [
        "--train-iters=6", save, f"--load={root / 'resumed'}",
        f"--save-hf={root / 'out' / 'resume-second'}",
    ]  # fmt: skip
    commands[2]["weights-step"] = [
        f"--hf-model={model}", f"--data-path={root / 'step'}", *COMMON, "--optimizer=sgd",
        "--sgd-momentum=0", f"--lr={LR}", "--lr-decay-style=constant", "--clip-grad=0",
        "--dcod-weighting=dcod", "--dcod-normalization=weights", "--dcod-no-pack",
        f"--dcod-scale={SCALE}", f"--dcod-offset={OFFSET}", f"--dcod-temperature={TEMPERATURE}",
        "--train-iters=1", "--zero-stage=2", f"--micro-batch-size={TRACES // 4}",
        f"--global-batch-size={TRACES}", f"--save-hf={root / 'out' / 'weights-step'}",
    ]  # fmt: skip
    logs = launch(commands[1], root, nproc=1) | launch(commands[2], root, nproc=2)
    return root, logs


def weights(root: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(root / "out" / run / "model.safetensors")


def assert_same_update(root, run, reference, before) -> None:
    """The run's update equals the reference's, and is far larger than the tolerance."""
    after, expected = weights(root, run), weights(root, reference)
    assert after.keys() == expected.keys()
    for name in expected:
        update, expected_update = after[name] - before[name], expected[name] - before[name]
        scale = float(expected_update.abs().max())
        assert scale > 1e-4, name  # SGD moved it: a halved or doubled step would show
        torch.testing.assert_close(update, expected_update, rtol=1e-4, atol=1e-4 * scale)


def test_zero_stages_data_parallel_and_micro_batches_agree(runs):
    root, logs = runs
    before = load_file(root / "model" / "model.safetensors")
    expected = logged_losses(logs["zero2-micro4"])
    assert sorted(expected) == [1, 2, 3]
    for run in SPLITS:
        losses = logged_losses(logs[run])
        assert losses.keys() == expected.keys(), run
        for iteration, loss in expected.items():
            assert losses[iteration] == pytest.approx(loss, rel=1e-5), (run, iteration)
        assert_same_update(root, run, "zero2-micro4", before)
    assert len(set(expected.values())) == 3  # the steps changed the model


def test_megatron_engine_gives_the_same_losses_and_weights(runs):
    """The cross-engine check: Megatron at DP=1 against this engine at ZeRO-3 DP=2."""
    root, logs = runs
    model = root / "model"
    run_distributed_test(import_to_megatron, 1, hf_dir=str(model), out=str(root / "mg-init"))
    output = train(
        *tiny_run_flags(model, root / "traces", iters=ITERS), *SGD, "--weight-decay=0",
        "--micro-batch-size=4", "--global-batch-size=4", f"--load={root / 'mg-init'}",
        "--finetune", f"--save={root / 'mg-run'}", f"--save-interval={ITERS}",
    )  # fmt: skip
    megatron, deepspeed = logged_losses(output), logged_losses(logs["zero3-dp2"])
    assert megatron.keys() == deepspeed.keys() == {1, 2, 3}
    # Megatron's log does not reset its sums after its first line: at log interval 1 the line
    # of iteration 2 holds the mean of steps 1 and 2 (megatron.training.training_log)
    deepspeed_as_megatron_logs = deepspeed | {2: (deepspeed[1] + deepspeed[2]) / 2}
    for iteration, loss in megatron.items():
        assert deepspeed_as_megatron_logs[iteration] == pytest.approx(loss, rel=1e-5), iteration
    assert len(set(deepspeed.values())) == 3
    run_distributed_test(
        export_megatron, 1, checkpoint=str(root / "mg-run"), template=str(model),
        out=str(root / "out" / "megatron"),
    )  # fmt: skip
    assert_same_update(root, "zero3-dp2", "megatron", load_file(model / "model.safetensors"))


def test_weights_normalization_step_equals_the_float64_reference(runs):
    root, _ = runs
    before = load_file(root / "model" / "model.safetensors")
    after = weights(root, "weights-step")
    expected = reference_updates(root / "model", root / "step", "weights")
    for name, update in expected.items():
        scale = float(update.abs().max())
        assert scale > 0, name
        measured = after[name].double() - before[name].double()
        resolution = 2 * torch.finfo(torch.float32).eps  # fp32 weights of norms are ≈ 1
        torch.testing.assert_close(
            measured, update, rtol=2e-3, atol=2e-4 * scale + resolution, msg=name
        )


def test_resume_is_bit_for_bit_at_zero3_dp2(runs):
    root, logs = runs
    reference = logged_losses(logs["resume-reference"])
    first, second = logged_losses(logs["resume-first"]), logged_losses(logs["resume-second"])
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    assert first | second == reference  # exact: same data, RNG, Adam state and LR schedule
    assert "resumed from" in logs["resume-second"]
    resumed, uninterrupted = weights(root, "resume-second"), weights(root, "resume-reference")
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_the_hf_save_loads_and_generates(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = runs
    out = root / "out" / "zero3-dp2"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("Compute 12 + 7.", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert model.config.use_cache and str(model.config.dtype) == "torch.float32"
