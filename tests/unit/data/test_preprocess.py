"""tools/preprocess_traces.py's library side: exact round trip, input forms, limits, reruns."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_dcod.config import PreprocessConfig, RecordFields
from megatron_dcod.data.encode import EncodeOptions, encoded_chunks
from megatron_dcod.data.preprocess import preprocess_traces
from megatron_dcod.data.trace_format import TraceDataset
from tests.helpers.models import save_tiny_llama

from ..conftest import PROBLEMS, write_jsonl


def build(tmp_path, inputs, tokenizer_dir, name="ds", **overrides):
    config = PreprocessConfig(
        inputs=tuple(str(path) for path in inputs),
        output_prefix=str(tmp_path / "out" / name),
        tokenizer=str(tokenizer_dir),
        **overrides,
    )
    return preprocess_traces(config), TraceDataset(config.output_prefix)


def test_round_trip_equals_inputs(tmp_path, tokenizer_dir, chat_tokenizer, teacher_records):
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records)
    meta, dataset = build(tmp_path, [source], tokenizer_dir)
    assert len(dataset) == len(teacher_records) == meta["records"]["kept"]
    assert dataset.meta["arrays"] == [
        "tokens",
        "loss_mask",
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
    ]
    for index, record in enumerate(teacher_records):
        trace = dataset[index]
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        reference = chat_tokenizer.tokenizer.apply_chat_template(messages, tokenize=True)
        reference = reference["input_ids"] if hasattr(reference, "keys") else reference
        assert trace.tokens.tolist() == list(reference)
        supervised = trace.loss_mask.astype(bool)
        assert trace.tokens[supervised].tolist() == record["teacher_token_ids"]
        expected = np.asarray(record["teacher_logprobs"], dtype=np.float32)
        assert trace.teacher_logprobs[supervised].tobytes() == expected.tobytes()
        assert not trace.teacher_logprobs[~supervised].any()
        topk_ids = [[entry["id"] for entry in position] for position in record["teacher_topk"]]
        topk_lp = [[entry["logprob"] for entry in position] for position in record["teacher_topk"]]
        assert trace.teacher_topk_ids[supervised].tolist() == topk_ids
        assert np.array_equal(
            trace.teacher_topk_logprobs[supervised], np.asarray(topk_lp, dtype=np.float16)
        )
    sidecar = [json.loads(line) for line in open(f"{dataset.prefix}.sidecar.jsonl")]
    assert [entry["answer"] for entry in sidecar] == [r["answer"] for r in teacher_records]
    assert sidecar[2]["record"] == 2 and sidecar[2]["input"] == str(source)


def test_alignment_on_a_hand_made_record(tmp_path, tokenizer_dir, chat_tokenizer):
    """Element i of teacher_logprobs is the log-prob of token i: encode the id in the value."""
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}]
    text = "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    assert chat_tokenizer.render(messages) == text
    ids = chat_tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]
    response_ids = chat_tokenizer.tokenizer("4.", add_special_tokens=False)["input_ids"]
    response_ids += [chat_tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert ids[-len(response_ids) - 1 : -1] == response_ids  # the trailing "\n" is not a target
    record = {
        "messages": messages,
        "teacher_token_ids": response_ids,
        "teacher_logprobs": [-token / 1000 for token in response_ids],
    }
    _, dataset = build(tmp_path, [write_jsonl(tmp_path / "r.jsonl", [record])], tokenizer_dir)
    trace = dataset[0]
    first = len(ids) - len(response_ids) - 1
    assert trace.loss_mask.tolist() == [0] * first + [1] * len(response_ids) + [0]
    for position in range(first, first + len(response_ids)):
        assert trace.teacher_logprobs[position] == np.float32(-ids[position] / 1000)


def test_input_forms_give_the_same_dataset(tmp_path, tokenizer_dir, teacher_records):
    import datasets

    renamed = [{"question": r["prompt"], "solution": r["response"]} for r in teacher_records]
    jsonl = write_jsonl(tmp_path / "a.jsonl", renamed)
    as_list = tmp_path / "b.json"
    as_list.write_text(json.dumps(renamed))
    as_object = tmp_path / "c.json"
    as_object.write_text(json.dumps({"data": renamed}))
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(renamed).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(renamed).save_to_disk(str(saved))
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    write_jsonl(files_dir / "train.jsonl", renamed)
    fields = RecordFields(prompt="question", response="solution")
    reference = None
    for name, source in [
        ("jsonl", jsonl),
        ("list", as_list),
        ("object", as_object),
        ("parquet", parquet),
        ("saved", saved),
        ("files", files_dir),
    ]:
        _, dataset = build(tmp_path, [source], tokenizer_dir, name=name, fields=fields)
        tokens = [dataset[i].tokens.tolist() for i in range(len(dataset))]
        assert len(tokens) == len(renamed), name
        assert reference is None or tokens == reference, name
        reference = tokens


def test_several_inputs_and_workers(tmp_path, tokenizer_dir, teacher_records):
    first = write_jsonl(tmp_path / "a.jsonl", teacher_records[:5])
    second = write_jsonl(tmp_path / "b.jsonl", teacher_records[5:])
    build(tmp_path, [first, second], tokenizer_dir, name="one")
    build(tmp_path, [first, second], tokenizer_dir, name="two", workers=2)
    for array in ("tokens", "loss_mask", "teacher_logprobs", "teacher_topk_ids"):
        one = (tmp_path / "out" / f"one_{array}.bin").read_bytes()
        assert one == (tmp_path / "out" / f"two_{array}.bin").read_bytes(), array


def multiprocessing_children() -> list[str]:
    """Command lines of this process's live children that multiprocessing started."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, UnicodeDecodeError):  # not a process, or gone meanwhile
            continue
        if int(ppid) == os.getpid() and "multiprocessing" in command:
            found.append(f"{state} {command}")
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_closing_the_chunks_ends_the_workers(tmp_path, tokenizer_dir, chat_tokenizer):
    """A run that stops early (bad record, Ctrl-C) closes encoded_chunks: that joins the workers
    and stops the resource tracker their pool started, with chunks still in flight."""
    records = [{"prompt": f"{i} + 1?", "response": f"{i + 1}"} for i in range(1000)]
    source = write_jsonl(tmp_path / "t.jsonl", records)
    config = PreprocessConfig(
        inputs=(str(source),), output_prefix="unused", tokenizer=str(tokenizer_dir), workers=2
    )
    options = EncodeOptions(config.fields, None, "truncate", keep_record_teacher=True)
    before = multiprocessing_children()
    chunks = encoded_chunks(config, chat_tokenizer, options)
    next(chunks)
    assert sum("spawn_main" in command for command in multiprocessing_children()) == 2
    chunks.close()
    assert multiprocessing_children() == before


def test_length_limit(tmp_path, tokenizer_dir, chat_tokenizer, teacher_records):
    source = write_jsonl(tmp_path / "t.jsonl", teacher_records)
    full_lengths = [
        len(t)
        for t, _ in chat_tokenizer.encode(
            [
                [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ]
                for r in teacher_records
            ]
        )
    ]
    limit = sorted(full_lengths)[len(full_lengths) // 2]
    longer = sum(length > limit for length in full_lengths)
    meta, dataset = build(
        tmp_path, [source], tokenizer_dir, name="drop", max_seq_length=limit, overlong="drop"
    )
    assert meta["records"]["dropped_overlong"] == longer
    assert len(dataset) == len(full_lengths) - longer
    meta, dataset = build(tmp_path, [source], tokenizer_dir, name="cut", max_seq_length=limit)
    assert meta["records"]["truncated"] == longer and len(dataset) == len(full_lengths)
    assert max(dataset.lengths) == limit
    with pytest.raises(ValueError, match="no trace to write.*'dropped_truncated_to_no_target': 12"):
        build(tmp_path, [source], tokenizer_dir, name="tiny", max_seq_length=4)
    assert not list((tmp_path / "out").glob("tiny*"))


def test_rerun_is_a_no_op_unless_overwrite(tmp_path, tokenizer_dir, teacher_records):
    source = write_jsonl(tmp_path / "t.jsonl", teacher_records)
    build(tmp_path, [source], tokenizer_dir)
    tokens_bin = tmp_path / "out" / "ds_tokens.bin"
    before = tokens_bin.stat().st_mtime_ns
    build(tmp_path, [source], tokenizer_dir, workers=2)  # workers do not change the result
    assert tokens_bin.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(tmp_path, [source], tokenizer_dir, max_seq_length=8)
    write_jsonl(source, teacher_records[:3])
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(tmp_path, [source], tokenizer_dir)
    meta, dataset = build(tmp_path, [source], tokenizer_dir, overwrite=True)
    assert len(dataset) == 3 and tokens_bin.stat().st_mtime_ns != before


def test_messages_records_multi_turn(tmp_path, tokenizer_dir):
    record = {
        "messages": [
            {"role": "user", "content": PROBLEMS[0][0]},
            {"role": "assistant", "content": "19"},
            {"role": "user", "content": PROBLEMS[1][0]},
            {"role": "assistant", "content": "12"},
        ]
    }
    _, dataset = build(tmp_path, [write_jsonl(tmp_path / "m.jsonl", [record])], tokenizer_dir)
    assert dataset.meta["arrays"] == ["tokens", "loss_mask"]
    mask = dataset[0].loss_mask.tolist()
    runs = sum(1 for a, b in zip([0] + mask, mask) if b and not a)
    assert runs == 2


def test_scoring_with_teacher_and_reference_models(
    tmp_path, tokenizer_dir, chat_tokenizer, teacher_records
):
    from megatron_dcod.config import ScoringConfig
    from megatron_dcod.inference.trace_scorer import CausalLMScorer

    vocab = len(chat_tokenizer.tokenizer)
    teacher = save_tiny_llama(tmp_path / "teacher", vocab, seed=1)
    ref = save_tiny_llama(tmp_path / "ref", vocab, seed=2)
    source = write_jsonl(tmp_path / "t.jsonl", teacher_records)  # their log-probs get replaced
    scoring = ScoringConfig(teacher_model=str(teacher), ref_model=str(ref), topk=2, batch_tokens=64)
    meta, dataset = build(tmp_path, [source], tokenizer_dir, scoring=scoring)
    assert meta["teacher_logprobs_from"] == "model"
    assert dataset.meta["arrays"] == [
        "tokens",
        "loss_mask",
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
        "ref_logprobs",
    ]
    traces = [dataset[i] for i in range(len(dataset))]
    inputs = [(trace.tokens, trace.loss_mask) for trace in traces]
    expected_teacher = CausalLMScorer(teacher, topk=2).score(inputs)
    expected_ref = CausalLMScorer(ref).score(inputs)
    for trace, by_teacher, by_ref in zip(traces, expected_teacher, expected_ref):
        np.testing.assert_allclose(trace.teacher_logprobs, by_teacher.logprobs, atol=1e-6)
        np.testing.assert_array_equal(trace.teacher_topk_ids, by_teacher.topk_ids)
        np.testing.assert_allclose(trace.ref_logprobs, by_ref.logprobs, atol=1e-6)
        assert (trace.teacher_logprobs[trace.loss_mask == 1] < 0).all()


def test_scoring_model_with_a_smaller_vocabulary(
    tmp_path, tokenizer_dir, chat_tokenizer, teacher_records
):
    from megatron_dcod.config import ScoringConfig

    small = save_tiny_llama(tmp_path / "small", len(chat_tokenizer.tokenizer) - 1, seed=0)
    source = write_jsonl(tmp_path / "t.jsonl", teacher_records)
    with pytest.raises(ValueError, match="must share the vocabulary"):
        build(tmp_path, [source], tokenizer_dir, scoring=ScoringConfig(teacher_model=str(small)))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_interrupted_build_resumes_where_it_stopped(
    tmp_path, tokenizer_dir, teacher_records, monkeypatch
):
    from megatron_dcod.data.trace_format import TraceDatasetWriter

    source = write_jsonl(tmp_path / "t.jsonl", teacher_records)  # 12 records, shards of 5
    build(tmp_path, [source], tokenizer_dir, name="straight", shard_records=5)
    original_add, added = TraceDatasetWriter.add, []

    def add_then_interrupt(self, trace, sidecar=None):
        if len(added) == 7:  # in the middle of the second shard
            raise KeyboardInterrupt
        added.append(trace)
        return original_add(self, trace, sidecar)

    monkeypatch.setattr(TraceDatasetWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, [source], tokenizer_dir, name="resumed", shard_records=5)
    out = tmp_path / "out"
    assert not list(out.glob("resumed*"))  # nothing at the prefix
    (work,) = out.glob(".resumed.build-*")
    progress = json.loads((work / "progress.json").read_text())
    assert [shard["records"] for shard in progress["shards"]] == [5]
    assert sorted(p.name for p in work.iterdir() if "partial" in p.name) == []  # shard 2 cleaned
    first_shard = work / "shard-000000_tokens.bin"
    written_at = first_shard.stat().st_mtime_ns

    added.clear()
    monkeypatch.setattr(
        TraceDatasetWriter,
        "add",
        lambda self, trace, sidecar=None: (added.append(trace), original_add(self, trace, sidecar))[
            1
        ],
    )
    monkeypatch.setattr(TraceDatasetWriter, "add_dataset", _watch_shards(first_shard, written_at))
    meta, _ = build(tmp_path, [source], tokenizer_dir, name="resumed", shard_records=5)
    assert len(added) == 7  # only the records after the finished shard were processed again
    assert meta["records"] == {"read": 12, "kept": 12}
    for suffix in (
        "_tokens.bin",
        "_loss_mask.bin",
        "_teacher_logprobs.bin",
        "_tokens.idx",
        "_teacher_topk_ids.bin",
        ".sidecar.jsonl",
    ):
        assert (out / f"resumed{suffix}").read_bytes() == (out / f"straight{suffix}").read_bytes()
    assert not work.exists()


def _watch_shards(first_shard, written_at):
    from megatron_dcod.data.trace_format import TraceDatasetWriter

    original = TraceDatasetWriter.add_dataset

    def add_dataset(self, prefix):
        if str(prefix).endswith("shard-000000"):  # reused as it was, not rewritten
            assert first_shard.stat().st_mtime_ns == written_at
        return original(self, prefix)

    return add_dataset
