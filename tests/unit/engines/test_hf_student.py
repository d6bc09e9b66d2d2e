"""engines/hf_student.py: the chunked output layer and the packed attention of the HF student,
against plain HF transformers (full logits, each trace run on its own)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.engines.hf_student import (
    PackedStudent,
    block_causal_mask,
    check_head,
    chunked_logprobs_at,
)
from tests.helpers.models import save_tiny_llama


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    directory = save_tiny_llama(tmp_path_factory.mktemp("llama"), vocab_size=50, init_std=0.2)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprobs_equal_the_full_log_softmax_with_their_gradient(chunk):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=generator, requires_grad=True)  # [b, s, h]
    head = torch.nn.Linear(16, 30, bias=False)
    ids = torch.randint(0, 30, (2, 7, 3), generator=generator)  # [b, s, k]
    chunked = chunked_logprobs_at(hidden, head, ids, chunk, config=None)
    (chunked * torch.arange(3.0)).sum().backward()
    chunked_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    full = head(hidden).log_softmax(-1).gather(-1, ids)
    (full * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grads[0], hidden.grad)
    torch.testing.assert_close(chunked_grads[1], head.weight.grad)


def test_block_causal_mask_keeps_each_token_in_its_segment():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = block_causal_mask(segments, torch.float32, boolean=True)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    additive = block_causal_mask(segments, torch.float32, boolean=False)[0, 0]
    assert torch.equal(additive == 0, expected)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_packed_row_equals_each_trace_on_its_own(causal_lm, implementation):
    causal_lm.config._attn_implementation = implementation
    traces = [torch.tensor([3, 9, 4, 7, 1]), torch.tensor([5, 2, 8]), torch.tensor([6, 6, 3, 2])]
    tokens = torch.cat(traces)[None]  # [1, 12] one packed row
    positions = torch.cat([torch.arange(len(trace)) for trace in traces])[None]
    segments = torch.cat([torch.full((len(t),), i) for i, t in enumerate(traces)])[None]
    ids = torch.stack([tokens.roll(-1, 1), tokens], dim=-1)  # [1, 12, 2] any ids
    packed = PackedStudent(causal_lm, chunk_tokens=5)(tokens, positions, segments, ids)[0]
    start = 0
    for trace in traces:
        span = slice(start, start + len(trace))
        with torch.no_grad():
            logits = causal_lm(trace[None]).logits[0]  # [T, V] the trace alone
        expected = logits.log_softmax(-1).gather(-1, ids[0, span])
        torch.testing.assert_close(packed[span], expected, rtol=1e-5, atol=1e-5)
        start += len(trace)


def test_check_head_refuses_an_output_transform_it_does_not_apply(causal_lm):
    causal_lm.config._attn_implementation = "sdpa"
    student = PackedStudent(causal_lm, chunk_tokens=4)
    check_head(student, 50, torch.device("cpu"))  # plain Llama: the chunked head is exact
    causal_lm.config.final_logit_softcapping = 0.5  # the engine would cap; Llama does not
    try:
        with pytest.raises(ValueError, match="differs from the model's own logits"):
            check_head(student, 50, torch.device("cpu"))
    finally:
        del causal_lm.config.final_logit_softcapping
