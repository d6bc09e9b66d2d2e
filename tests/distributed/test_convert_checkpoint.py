"""tools/convert_checkpoint.py: HF ↔ Megatron for every family, at TP=1, TP=2 and PP=2.

References are plain HF transformers: the imported checkpoint, read by Megatron at each layout,
gives the HF logits; export after import gives the HF tensors back bit for bit; a checkpoint the
trainer wrote at TP=2 exports to an HF model with the Megatron model's logits and greedy text.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_dcod.checkpoint.import_hf import import_hf
from megatron_dcod.config import ExportConfig, ImportConfig
from tests.helpers.distributed import run_distributed_test
from tests.helpers.megatron_model import layout_logits, megatron_outputs
from tests.helpers.models import save_tiny_family_model
from tests.helpers.training import REPO, tiny_run_flags, train
from tests.helpers.traces import write_synthetic_traces

FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},  # q/k norms, tied, head_dim ≠ h/n
}
MULTIPLE = 32  # vocab 100 → 128 rows at TP=1 and TP=2 (Megatron pads to MULTIPLE × TP)
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()


def import_all(cases: list) -> None:
    for hf_dir, out, options in cases:
        import_hf(
            ImportConfig(Path(hf_dir), Path(out), make_vocab_size_divisible_by=MULTIPLE, **options)
        )


def export_all(cases: list) -> None:
    from megatron_dcod.checkpoint.export_hf import export_hf

    for checkpoint, template, out in cases:
        export_hf(ExportConfig(Path(checkpoint), Path(template), Path(out), max_shard_bytes=30_000))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (hf_dir, imported checkpoint)}, imported for TP=2 in one process."""
    root = tmp_path_factory.mktemp("convert")
    dirs = {
        family: (
            save_tiny_family_model(root / f"hf-{family}", family, **overrides),
            root / f"mg-{family}",
        )
        for family, overrides in FAMILY_OVERRIDES.items()
    }
    cases = [(str(hf), str(mg), {"tensor_model_parallel_size": 2}) for hf, mg in dirs.values()]
    run_distributed_test(import_all, world_size=1, cases=cases)
    return dirs


def hf_logits(hf_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_imported_logits_equal_hf(converted, tmp_path, tp, pp):
    cases = {family: (str(hf), str(mg), MULTIPLE) for family, (hf, mg) in converted.items()}
    run_distributed_test(
        layout_logits,
        world_size=tp * pp,
        cases=cases,
        tokens=TOKENS,
        tp=tp,
        pp=pp,
        out_dir=str(tmp_path),
    )
    for family, (hf, _) in converted.items():
        megatron = torch.load(tmp_path / f"{family}.pt")
        difference = (megatron - hf_logits(hf)).abs().max().item()
        assert difference <= 1e-5, (family, difference)


def safetensors_of(directory: Path) -> dict:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_import_then_export_is_bit_identical(converted, tmp_path):
    bf16 = save_tiny_family_model(tmp_path / "hf-bf16", "qwen2", dtype=torch.bfloat16)
    run_distributed_test(
        import_all, world_size=1, cases=[(str(bf16), str(tmp_path / "mg-bf16"), {})]
    )
    cases = {family: (mg, hf) for family, (hf, mg) in converted.items()}
    cases["bf16"] = (tmp_path / "mg-bf16", bf16)
    exports = [
        (str(mg), str(hf), str(tmp_path / f"out-{name}")) for name, (mg, hf) in cases.items()
    ]
    run_distributed_test(export_all, world_size=1, cases=exports)
    for name, (_, hf) in cases.items():
        out = tmp_path / f"out-{name}"
        original, exported = safetensors_of(hf), safetensors_of(out)
        assert original.keys() == exported.keys(), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)
        assert (out / "generation_config.json").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert reloaded.dtype == next(iter(original.values())).dtype
    assert not list(tmp_path.glob("*.partial"))


def test_trained_at_tp2_exports_to_the_same_model(converted, tmp_path):
    """The trainer fine-tunes the imported Llama for 2 steps at TP=2 (--load of the import);
    the export's HF logits and greedy continuation equal those of Megatron's model."""
    hf_dir, imported = converted["llama"]
    data = write_synthetic_traces(tmp_path / "traces", count=32, vocab=100)
    save = tmp_path / "run"
    train(
        *tiny_run_flags(hf_dir, data, iters=2),
        f"--load={imported}", f"--save={save}", "--save-interval=2",
        "--tensor-model-parallel-size=2", "--micro-batch-size=2", "--global-batch-size=2",
        nproc=2,
    )  # fmt: skip
    flags = [
        f"--hf-config={hf_dir}", f"--load={save}", "--no-load-optim", "--no-load-rng",
        "--tensor-model-parallel-size=2", f"--make-vocab-size-divisible-by={MULTIPLE}",
        "--seq-length=12", "--micro-batch-size=2", "--ckpt-format=torch_dist",
    ]  # fmt: skip
    out = tmp_path / "megatron.pt"
    run_distributed_test(
        megatron_outputs, world_size=2, flags=flags, tokens=TOKENS, new_tokens=8, out=str(out)
    )
    exported = tmp_path / "hf-trained"
    run_distributed_test(export_all, world_size=1, cases=[(str(save), str(hf_dir), str(exported))])
    megatron = torch.load(out)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits
        greedy = model.generate(torch.tensor(TOKENS), max_new_tokens=8, do_sample=False)
    assert (logits - megatron["logits"]).abs().max() <= 1e-5
    assert not torch.allclose(logits, hf_logits(hf_dir), atol=1e-3)  # training moved the weights
    assert torch.equal(greedy, megatron["greedy"])


def convert(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_refuses_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = convert("import-hf", "--hf-dir", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "'gpt2' is not one of ('llama', 'qwen2', 'qwen3', 'mistral')" in result.stderr
    assert not (tmp_path / "o").exists()


def test_import_refusals_before_writing(converted, tmp_path):
    hf_dir, _ = converted["llama"]
    config = lambda **kw: ImportConfig(hf_dir, tmp_path / "out", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="size 3 does not divide the 4 attention heads"):
        import_hf(config(tensor_model_parallel_size=3))
    with pytest.raises(ValueError, match="size 4 does not divide the 2 layers"):
        import_hf(config(pipeline_model_parallel_size=4))
    with pytest.raises(FileExistsError, match="exists; choose a new --out"):
        import_hf(ImportConfig(hf_dir, converted["qwen2"][1]))
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in hf_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"{shard.name}: unreadable safetensors file"):
        import_hf(ImportConfig(broken, tmp_path / "out"))
    shard.unlink()
    with pytest.raises(
        ValueError, match=f"{shard.name}: shard listed in the checkpoint is missing"
    ):
        import_hf(ImportConfig(broken, tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def convert_expecting_error(kind: str, config, pattern: str) -> None:
    import re

    from megatron_dcod.checkpoint.export_hf import export_hf

    with pytest.raises((ValueError, FileExistsError)) as error:
        (import_hf if kind == "import" else export_hf)(config)
    assert re.search(pattern, str(error.value)), str(error.value)
    assert not config.out.exists()
    assert not config.out.with_name(config.out.name + ".partial").exists()


def test_shape_and_vocab_mismatches_leave_nothing(converted, tmp_path):
    """A config that does not fit the weights fails mid-write; a template whose vocabulary the
    checkpoint's padding cannot explain fails the export; neither leaves output behind."""
    hf_dir, imported = converted["llama"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for file in hf_dir.iterdir():
        (wrong / file.name).write_bytes(file.read_bytes())
    settings = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**settings, "intermediate_size": 48}))
    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text(json.dumps({**settings, "vocab_size": 300}))
    run_distributed_test(
        expect_mismatch_errors, world_size=1, wrong=str(wrong), template=str(template),
        imported=str(imported), out=str(tmp_path / "out"),
    )  # fmt: skip


def expect_mismatch_errors(wrong: str, template: str, imported: str, out: str) -> None:
    config = ImportConfig(Path(wrong), Path(out), make_vocab_size_divisible_by=MULTIPLE)
    convert_expecting_error(
        "import", config, r"model-\d+-of-\d+\.safetensors: model\.layers\.0\.mlp\.\w+_proj\.weight "
        r"has shape \((64, 32|32, 64)\), the config implies \((48, 32|32, 48)\)",
    )  # fmt: skip
    export = ExportConfig(Path(imported), Path(template), Path(out))
    convert_expecting_error("export", export, "128 embedding rows, but vocab_size 300 .* gives 320")
