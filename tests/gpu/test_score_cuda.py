"""The Megatron scorer on a GPU (NCCL, bf16) against the HF scorer in fp32 (skipped without
CUDA): one process, and TP=2 when two GPUs are there."""

import shutil

import numpy as np
import pytest
import torch

from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.inference.trace_scorer import CausalLMScorer
from tests.distributed.test_score import (
    TOKENIZER_IDS,
    TOPK,
    copy_dataset,
    import_all,
    run_scorer,
    score_flags,
)
from tests.helpers.distributed import run_distributed_test
from tests.helpers.models import TOKENIZER_TEXTS, save_tiny_family_model, tokenizer_fingerprint
from tests.helpers.scoring import write_untaught_traces

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_bf16_on_cuda_follows_fp32_hf(tmp_path, tp):
    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    hf_dir = save_tiny_family_model(tmp_path / "hf", "qwen2", vocab_size=330)
    tokenizer = train_tiny_tokenizer(TOKENIZER_TEXTS, tmp_path / "tok", TOKENIZER_IDS)
    for file in tokenizer.iterdir():
        shutil.copy(file, hf_dir)
    run_distributed_test(import_all, world_size=1, cases=[(str(hf_dir), str(tmp_path / "mg"))])
    untaught = write_untaught_traces(tmp_path / "u" / "traces", tokenizer_fingerprint(hf_dir), 320)
    prefix = copy_dataset(untaught, tmp_path / "scored")
    flags = score_flags(
        hf_dir, tmp_path / "mg", prefix, "--bf16", f"--tensor-model-parallel-size={tp}"
    )
    result = run_scorer(flags, processes=tp)
    assert result.returncode == 0, result.stderr[-4000:]
    dataset = TraceDataset(prefix)
    assert dataset.meta["scoring"]["teacher"]["dtype"] == "bf16"
    traces = [(dataset[i].tokens, dataset[i].loss_mask) for i in range(len(dataset))]
    reference = CausalLMScorer(hf_dir, topk=TOPK).score(traces)
    errors = np.concatenate(
        [np.abs(dataset[i].teacher_logprobs - r.logprobs) for i, r in enumerate(reference)]
    )
    assert errors.max() < 0.1 and errors.mean() < 0.02, (errors.max(), errors.mean())
