"""Teacher scoring on a GPU in bf16 (skipped without CUDA)."""

import numpy as np
import pytest
import torch

from megatron_dcod.inference.trace_scorer import CausalLMScorer
from tests.helpers.models import save_tiny_llama
from tests.unit.inference.test_trace_scorer import VOCAB, make_traces

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_bf16_matches_cpu_fp32(tmp_path):
    model_dir = save_tiny_llama(tmp_path, VOCAB)
    traces = make_traces()
    on_cpu = CausalLMScorer(model_dir, topk=2).score(traces)
    on_gpu = CausalLMScorer(model_dir, device="cuda", dtype="bf16", topk=2).score(traces)
    for cpu_result, gpu_result in zip(on_cpu, on_gpu):
        assert gpu_result.logprobs.dtype == np.float32
        np.testing.assert_allclose(gpu_result.logprobs, cpu_result.logprobs, atol=0.05)
