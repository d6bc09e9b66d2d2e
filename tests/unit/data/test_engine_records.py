"""Inference-engine outputs (vLLM, SGLang, OpenAI-compatible) as records of preprocess_traces:
hand-made from real float64 log-probs of the tiny model over the rendered conversation, they
must give the dataset exactly those log-probs (and top-k) at the supervised positions."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dcod.config import PreprocessConfig, ScoringConfig
from megatron_dcod.data.engine_records import vllm_prompt_logprobs
from megatron_dcod.data.preprocess import preprocess_traces
from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.inference.trace_scorer import CausalLMScorer
from tests.helpers.engine_records import expected_teacher, openai_record, score_conversation
from tests.helpers.engine_records import sglang_record, vllm_entries, vllm_record

from ..conftest import PROBLEMS, write_jsonl

K = 3


@pytest.fixture(scope="module")
def scored(tiny_model_dir, chat_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    conversations = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        for prompt, response in PROBLEMS[:3]
    ]
    return [score_conversation(model, chat_tokenizer, messages) for messages in conversations]


def build(tmp_path, records, tokenizer_dir, name="ds", **overrides):
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    config = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(tmp_path / "out" / name),
        tokenizer=str(tokenizer_dir),
        **overrides,
    )
    return preprocess_traces(config), TraceDataset(config.output_prefix), source


def assert_teacher(dataset, scored, k=K):
    assert len(dataset) == len(scored)
    for index, expected in enumerate(scored):
        trace = dataset[index]
        assert trace.tokens.tolist() == expected.tokens.tolist()
        logprobs, ids, values = expected_teacher(expected, k)
        np.testing.assert_allclose(trace.teacher_logprobs, logprobs, rtol=0, atol=1e-6)
        if k:
            np.testing.assert_array_equal(trace.teacher_topk_ids, ids)
            np.testing.assert_array_equal(trace.teacher_topk_logprobs, values.astype(np.float16))
        else:
            assert trace.teacher_topk_ids is None


@pytest.mark.parametrize("server", [False, True], ids=["request_output", "server"])
def test_vllm_records(tmp_path, tokenizer_dir, scored, tiny_model_dir, server):
    records = [vllm_record(s, K, server=server) for s in scored]
    listed = {
        len(entries)
        for record in records
        for entries in record.get("prompt_logprobs") or record["choices"][0]["prompt_logprobs"]
        if entries
    }
    assert listed == {K, K + 1}  # the actual token inside the top-k, and outside it
    meta, dataset, _ = build(tmp_path, records, tokenizer_dir)
    assert_teacher(dataset, scored)
    assert meta["teacher_logprobs_from"] == "records"
    sidecar = [json.loads(line) for line in open(f"{dataset.prefix}.sidecar.jsonl")]
    assert sidecar[0] == {"input": sidecar[0]["input"], "record": 0, "id": "r"}
    # the HF scorer agrees on the same traces
    traces = [(dataset[i].tokens, dataset[i].loss_mask) for i in range(len(dataset))]
    for index, by_hf in enumerate(CausalLMScorer(tiny_model_dir, topk=K).score(traces)):
        np.testing.assert_allclose(dataset[index].teacher_logprobs, by_hf.logprobs, atol=1e-5)
        np.testing.assert_array_equal(dataset[index].teacher_topk_ids, by_hf.topk_ids)


def test_vllm_reader_takes_logprob_objects_and_ties():
    """RequestOutput entries are Logprob objects with int keys; an actual token tied with the
    k-th listed one has rank k and still stays out of a top-k it is not listed in."""

    class Logprob:
        def __init__(self, logprob, rank):
            self.logprob, self.rank = logprob, rank

    ids = np.asarray([7, 2, 9])
    prompt_logprobs = [
        None,
        {2: Logprob(-0.5, 1), 4: Logprob(-1.0, 2)},
        {9: Logprob(-2.0, 2), 1: Logprob(-0.1, 1), 3: Logprob(-2.0, 2)},
    ]
    logprobs, topk_ids, topk_logprobs = vllm_prompt_logprobs(ids, prompt_logprobs)
    assert np.isnan(logprobs[0]) and logprobs[1:].tolist() == [-0.5, -2.0]
    assert topk_ids[1:].tolist() == [[2, 4], [1, 3]]
    assert topk_logprobs[2].tolist() == [-0.1, -2.0]


@pytest.mark.parametrize("start,input_ids", [(0, False), (-1, False), (-1, True)])
def test_sglang_records(tmp_path, tokenizer_dir, scored, start, input_ids):
    """start -1: logprob_start_len just before the first supervised token (its own entry null),
    given as the field or implied by the request's input_ids."""
    first = [int(np.argmax(s.loss_mask)) for s in scored]
    records = [
        sglang_record(s, K, start=f - 1 if start < 0 else 0, input_ids=input_ids)
        for s, f in zip(scored, first)
    ]
    _, dataset, _ = build(tmp_path, records, tokenizer_dir)
    assert_teacher(dataset, scored)


def test_sglang_start_past_a_supervised_token(tmp_path, tokenizer_dir, scored):
    first = int(np.argmax(scored[0].loss_mask))
    records = [sglang_record(scored[0], K, start=first)]
    with pytest.raises(
        ValueError, match=rf"sglang log-prob is null at supervised position {first}"
    ):
        build(tmp_path, records, tokenizer_dir, name="at")
    records = [sglang_record(scored[0], K, start=first + 1)]
    with pytest.raises(ValueError, match=rf"{first} lies before logprob_start_len {first + 1}"):
        build(tmp_path, records, tokenizer_dir, name="past")


@pytest.mark.parametrize("usage", [True, False])
def test_openai_records_with_token_ids(tmp_path, tokenizer_dir, scored, usage):
    records = [openai_record(s, K, generated=1, usage=usage) for s in scored]
    meta, dataset, _ = build(tmp_path, records, tokenizer_dir)
    assert_teacher(dataset, scored)
    sidecar = json.loads(open(f"{dataset.prefix}.sidecar.jsonl").readline())
    assert "choices" not in sidecar and sidecar["object"] == "text_completion"


def test_openai_records_with_token_strings(tmp_path, tokenizer_dir, chat_tokenizer, scored):
    """Plain strings are checked against the student's tokens decoded alone; a top-k named by
    text is refused, a top_logprobs of the token alone (logprobs=0) carries none."""
    text_of = lambda token: chat_tokenizer.tokenizer.decode([token])  # noqa: E731
    records = [openai_record(s, 0, text_of=text_of, generated=0) for s in scored]
    _, dataset, _ = build(tmp_path, records, tokenizer_dir)
    assert_teacher(dataset, scored, k=0)
    wrong = openai_record(scored[0], 0, text_of=text_of, generated=0)
    position = int(np.argmax(scored[0].loss_mask)) + 1
    wrong["choices"][0]["logprobs"]["tokens"][position] = "zz"
    with pytest.raises(
        ValueError, match=rf"first difference at position {position}: engine \['zz'"
    ):
        build(tmp_path, [wrong], tokenizer_dir, name="wrong")
    with_topk = [openai_record(scored[0], K, text_of=text_of)]
    with pytest.raises(ValueError, match="--return-tokens-as-token-ids"):
        build(tmp_path, with_topk, tokenizer_dir, name="topk")


def test_ids_that_do_not_match_the_student_tokenization(tmp_path, tokenizer_dir, scored):
    record = vllm_record(scored[1], K)
    position = int(np.flatnonzero(scored[1].loss_mask)[2])
    other = (int(scored[1].tokens[position]) + 1) % 300
    record["prompt_token_ids"][position] = other
    entry = {t: e for t, e in record["prompt_logprobs"][position].items() if e["rank"] <= K}
    record["prompt_logprobs"][position] = {**entry, str(other): {"logprob": -3.0, "rank": 50}}
    good = vllm_record(scored[0], K)
    with pytest.raises(ValueError) as error:
        build(tmp_path, [good, record], tokenizer_dir)
    assert "ds.jsonl:2: the vllm tokens do not match the student tokenization" in str(error.value)
    assert f"first difference at position {position}" in str(error.value)
    short = vllm_record(scored[0], K)
    short["prompt_token_ids"].pop()
    short["prompt_logprobs"].pop()
    with pytest.raises(ValueError, match=r"ds2.jsonl:1: the vllm output ends at position"):
        build(tmp_path, [short], tokenizer_dir, name="ds2")


BAD = {
    "missing actual token": (
        lambda r: r["prompt_logprobs"][3].pop(str(r["prompt_token_ids"][3])),
        "prompt_logprobs\\[3\\] has no entry for the actual token",
    ),
    "positive": (
        lambda r: r["prompt_logprobs"][2][str(r["prompt_token_ids"][2])].update(logprob=0.5),
        "must be finite and <= 0",
    ),
    "inconsistent k": (
        lambda r: r["prompt_logprobs"].__setitem__(
            4, {str(r["prompt_token_ids"][4]): {"logprob": -1.0, "rank": 1}}
        ),
        "inconsistent top-k",
    ),
    "null at a supervised position": (
        lambda r: r["prompt_logprobs"].__setitem__(-2, None),
        "vllm log-prob is null at supervised position",
    ),
    "no ids": (lambda r: r.pop("prompt_token_ids"), "no 'prompt_token_ids'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_engine_records_are_named(tmp_path, tokenizer_dir, scored, case):
    spoil, message = BAD[case]
    record = vllm_record(scored[0], K)
    spoil(record)
    with pytest.raises(ValueError, match=rf"ds.jsonl:2: .*{message}"):
        build(tmp_path, [vllm_record(scored[1], K), record], tokenizer_dir)
    meta, dataset, _ = build(
        tmp_path, [vllm_record(scored[1], K), record], tokenizer_dir, skip_bad=True
    )
    assert meta["records"] == {"read": 2, "kept": 1, "skipped_invalid": 1}


def test_auto_detection_and_forcing(tmp_path, tokenizer_dir, scored):
    mixed = [vllm_record(scored[0], K), sglang_record(scored[1], K), openai_record(scored[2], K)]
    _, dataset, _ = build(tmp_path, mixed, tokenizer_dir, name="mixed", workers=2)
    assert_teacher(dataset, scored)
    forced = [vllm_record(s, K, server=True) for s in scored]
    _, dataset, _ = build(tmp_path, forced, tokenizer_dir, name="forced", record_format="vllm")
    assert_teacher(dataset, scored)
    with pytest.raises(
        ValueError,
        match=r"wrong.jsonl:1: sglang output: no 'meta_info.input_token_logprobs'.*looks like vllm",
    ):
        build(tmp_path, forced[:1], tokenizer_dir, name="wrong", record_format="sglang")
    native = {"messages": scored[0].messages, "teacher_logprobs": [-1.0], "teacher_token_ids": [1]}
    with pytest.raises(
        ValueError,
        match=r"native.jsonl:1: --record-format openai, but the record carries the native",
    ):
        build(tmp_path, [native], tokenizer_dir, name="native", record_format="openai")
    _, dataset, _ = build(tmp_path, forced, tokenizer_dir, name="asnative", record_format="native")
    assert dataset.meta["arrays"] == ["tokens", "loss_mask"]  # engine fields: just more fields
    assert "choices" in json.loads(open(f"{dataset.prefix}.sidecar.jsonl").readline())


def test_scoring_replaces_engine_arrays(tmp_path, tokenizer_dir, scored, tiny_model_dir):
    scoring = ScoringConfig(teacher_model=str(tiny_model_dir), topk=2, batch_tokens=64)
    records = [sglang_record(s, K) for s in scored]
    meta, dataset, _ = build(tmp_path, records, tokenizer_dir, scoring=scoring)
    assert meta["teacher_logprobs_from"] == "model" and dataset.topk == 2
    for index, expected in enumerate(scored):
        logprobs, ids, _ = expected_teacher(expected, 2)
        np.testing.assert_allclose(dataset[index].teacher_logprobs, logprobs, atol=1e-5)
        np.testing.assert_array_equal(dataset[index].teacher_topk_ids, ids)
    broken = sglang_record(scored[0], K)
    broken["meta_info"]["input_token_logprobs"][3][0] = 1.5  # still validated
    with pytest.raises(ValueError, match=r"bad.jsonl:1: sglang output: .*must be finite and <= 0"):
        build(tmp_path, [broken], tokenizer_dir, name="bad", scoring=scoring)
