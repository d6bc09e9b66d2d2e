"""The on-disk trace format: exact round trip, alignment checks, refusals, atomic writes."""

import json

import numpy as np
import pytest

from megatron_dcod.data.trace_format import (
    FORMAT_VERSION,
    Trace,
    TokenizerFingerprint,
    TraceDataset,
    TraceDatasetWriter,
    TraceFormatError,
    check_tokenizer,
    meta_path,
    validate_trace,
)

ALL_ARRAYS = (
    "tokens",
    "loss_mask",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "ref_logprobs",
    "source",
)
FINGERPRINT = TokenizerFingerprint("tok", 100, "a" * 64, "b" * 64)


def random_trace(rng: np.random.Generator, length: int, k: int = 4) -> Trace:
    mask = (rng.random(length) < 0.6).astype(np.uint8)
    mask[0], mask[-1] = 0, 1
    return Trace(
        tokens=rng.integers(0, 100, length, dtype=np.int32),
        loss_mask=mask,
        teacher_logprobs=np.where(mask, -rng.exponential(size=length), 0).astype(np.float32),
        teacher_topk_ids=rng.integers(0, 100, (length, k), dtype=np.int32),
        teacher_topk_logprobs=(-rng.exponential(size=(length, k))).astype(np.float16),
        ref_logprobs=np.where(mask, -rng.exponential(size=length), 0).astype(np.float32),
        source=np.where(mask, rng.integers(1, 4, length), 0).astype(np.uint8),
    )


def write(prefix, traces, k=4, meta=None):
    with TraceDatasetWriter(prefix, ALL_ARRAYS, topk=k) as writer:
        for index, trace in enumerate(traces):
            writer.add(trace, {"index": index})
        return writer.commit({"tokenizer": FINGERPRINT.__dict__, **(meta or {})})


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    traces = [random_trace(rng, length) for length in (2, 17, 300, 5)]
    meta = write(tmp_path / "ds", traces)
    dataset = TraceDataset(tmp_path / "ds", tokenizer=FINGERPRINT)
    assert len(dataset) == len(traces) == meta["counts"]["traces"]
    for original, loaded in zip(traces, (dataset[i] for i in range(len(dataset)))):
        for name in ALL_ARRAYS:
            expected, actual = getattr(original, name), getattr(loaded, name)
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
            assert actual.tobytes() == expected.tobytes(), name
    assert meta["counts"]["tokens"] == sum(len(t.tokens) for t in traces)
    assert meta["counts"]["supervised_tokens"] == sum(int(t.loss_mask.sum()) for t in traces)
    expected_mean = (
        np.concatenate([t.teacher_logprobs[t.loss_mask == 1] for t in traces])
        .astype(np.float64)
        .mean()
    )
    assert meta["stats"]["teacher_logprob_mean"] == pytest.approx(expected_mean, rel=1e-9)
    flat_topk = np.concatenate([t.teacher_topk_logprobs for t in traces])
    assert np.array_equal(dataset.flat("teacher_topk_logprobs"), flat_topk)
    sidecar = (tmp_path / "ds.sidecar.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in sidecar] == list(range(len(traces)))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.loss_mask.__setitem__(0, 1), "element 0 is supervised"),
        (lambda t: t.loss_mask.fill(0), "no supervised token"),
        (lambda t: t.teacher_logprobs.__setitem__(3, np.nan), "teacher_logprobs at token 3"),
        (lambda t: t.ref_logprobs.__setitem__(2, np.inf), "ref_logprobs at token 2"),
        (lambda t: t.teacher_logprobs.__setitem__(1, 0.5), "must be finite and <= 0"),
        (lambda t: setattr(t, "source", t.source[:-1]), "source has 9 positions for 10 tokens"),
        (lambda t: t.source.__setitem__(9, 0), "source at token 9 is 0 on a supervised token"),
        (lambda t: t.source.__setitem__(9, 4), "source at token 9 is 4 on a supervised token"),
        (lambda t: t.source.__setitem__(0, 2), "source at token 0 is 2 on an unsupervised"),
    ],
)
def test_validate_trace_rejects(corrupt, message):
    trace = random_trace(np.random.default_rng(1), 10)
    validate_trace(trace)
    corrupt(trace)
    with pytest.raises(TraceFormatError, match=message):
        validate_trace(trace)


def test_failed_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError):
        with TraceDatasetWriter(tmp_path / "ds", ALL_ARRAYS, topk=4) as writer:
            writer.add(random_trace(rng, 8))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_inconsistent_traces(tmp_path):
    rng = np.random.default_rng(3)
    with TraceDatasetWriter(tmp_path / "ds", ALL_ARRAYS, topk=4) as writer:
        trace = random_trace(rng, 8, k=2)
        with pytest.raises(TraceFormatError, match="expected k=4"):
            writer.add(trace)
        trace = random_trace(rng, 8)
        trace.ref_logprobs = None
        with pytest.raises(TraceFormatError, match="trace carries"):
            writer.add(trace)
        good = random_trace(rng, 5)
        writer.add(good)  # the refused traces left nothing behind: the dataset stays aligned
        writer.commit({"tokenizer": FINGERPRINT.__dict__})
    dataset = TraceDataset(tmp_path / "ds")
    assert (
        len(dataset) == 1
        and dataset[0].teacher_topk_ids.tobytes() == good.teacher_topk_ids.tobytes()
    )


def test_commit_replaces_an_older_dataset(tmp_path):
    rng = np.random.default_rng(4)
    write(tmp_path / "ds", [random_trace(rng, 6) for _ in range(3)])
    write(tmp_path / "ds", [random_trace(rng, 9)])
    dataset = TraceDataset(tmp_path / "ds")
    assert len(dataset) == 1 and len(dataset[0].tokens) == 9
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_reader_refuses_other_format_version_and_tokenizer(tmp_path):
    write(tmp_path / "ds", [random_trace(np.random.default_rng(5), 6)])
    other = TokenizerFingerprint("elsewhere/tok", 100, "c" * 64, "b" * 64)
    with pytest.raises(TraceFormatError, match=r"tokenizer mismatch in \['vocab_sha256'\]"):
        TraceDataset(tmp_path / "ds", tokenizer=other)
    same_but_moved = TokenizerFingerprint("elsewhere/tok", 100, "a" * 64, "b" * 64)
    check_tokenizer(TraceDataset(tmp_path / "ds").meta, same_but_moved, "ds")
    meta = json.loads(meta_path(tmp_path / "ds").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path(tmp_path / "ds").write_text(json.dumps(meta))
    with pytest.raises(TraceFormatError, match="format version"):
        TraceDataset(tmp_path / "ds")


def test_reader_refuses_misaligned_arrays(tmp_path):
    rng = np.random.default_rng(6)
    write(tmp_path / "a", [random_trace(rng, 6), random_trace(rng, 7)])
    write(tmp_path / "b", [random_trace(rng, 7), random_trace(rng, 6)])
    for ext in (".bin", ".idx"):
        (tmp_path / f"b_teacher_logprobs{ext}").replace(tmp_path / f"a_teacher_logprobs{ext}")
    with pytest.raises(TraceFormatError, match="teacher_logprobs is not aligned"):
        TraceDataset(tmp_path / "a")


def test_missing_dataset(tmp_path):
    with pytest.raises(TraceFormatError, match="meta.json missing"):
        TraceDataset(tmp_path / "nothing")


def test_a_trace_outlives_its_dataset_object(tmp_path):
    """Views into the memory map stay valid after the TraceDataset is dropped."""
    import gc

    original = random_trace(np.random.default_rng(7), 50)
    write(tmp_path / "ds", [original])
    trace = TraceDataset(tmp_path / "ds")[0]
    gc.collect()
    assert trace.tokens.tobytes() == original.tokens.tobytes()
    assert trace.teacher_topk_logprobs.tobytes() == original.teacher_topk_logprobs.tobytes()


def test_lengths_outlive_the_dataset_object(tmp_path):
    """`TraceDataset(p).lengths` used to be a view of an index that megatron-core unmaps when
    the dataset goes (a segfault in a fresh process); it is a copy now."""
    import subprocess
    import sys

    rng = np.random.default_rng(8)
    write(tmp_path / "ds", [random_trace(rng, length) for length in (3, 40, 9)])
    code = (
        "import sys; from megatron_dcod.data.trace_format import TraceDataset; "
        "print(TraceDataset(sys.argv[1]).lengths.astype('int64').tolist())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ds")], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "[3, 40, 9]", result.stderr


@pytest.mark.parametrize("damage", ["short bin", "long bin", "short idx", "missing bin"])
def test_damaged_array_files_are_refused_at_open(tmp_path, damage):
    """A truncated copy is refused when the dataset is opened, naming the file and sizes, not
    mid-run inside a data-loader worker."""
    import os

    rng = np.random.default_rng(9)
    write(tmp_path / "ds", [random_trace(rng, length) for length in (5, 30, 12)])
    path = tmp_path / "ds_teacher_topk_ids"
    binary, index = path.with_suffix(".bin"), path.with_suffix(".idx")
    size = binary.stat().st_size
    if damage == "short bin":
        os.truncate(binary, size - 8)
        message = rf"{binary}: {size - 8} bytes, its index describes {size}"
    elif damage == "long bin":
        with open(binary, "ab") as extra:
            extra.write(b"\0" * 4)
        message = rf"{binary}: {size + 4} bytes, its index describes {size}"
    elif damage == "short idx":
        os.truncate(index, index.stat().st_size // 2)
        message = rf"{index}: unreadable index"
    else:
        binary.unlink()
        message = rf"{binary}: missing"
    with pytest.raises(TraceFormatError, match=message):
        TraceDataset(tmp_path / "ds")


def test_inspect_refuses_a_truncated_copy(tmp_path, capsys):
    import os

    from tools.inspect_traces import main as inspect_main

    rng = np.random.default_rng(10)
    write(tmp_path / "ds", [random_trace(rng, length) for length in (5, 30)])
    binary = tmp_path / "ds_tokens.bin"
    os.truncate(binary, binary.stat().st_size - 4)
    assert inspect_main([str(tmp_path / "ds")]) == 1
    assert f"error: {binary}: " in capsys.readouterr().err


def test_topk_logprobs_below_float16_range_are_stored_finite(tmp_path):
    """A valid log-prob below −65504 (float16's range) is stored as −65504, not −inf."""
    trace = random_trace(np.random.default_rng(11), 6)
    trace.teacher_topk_logprobs = trace.teacher_topk_logprobs.astype(np.float32)
    trace.teacher_topk_logprobs[3, 0] = -1e6
    write(tmp_path / "ds", [trace])
    stored = TraceDataset(tmp_path / "ds")[0].teacher_topk_logprobs
    assert stored[3, 0] == np.finfo(np.float16).min and np.isfinite(stored).all()


def test_supervised_tokens_by_source_survive_merging(tmp_path):
    """meta.json counts supervised tokens by source; merging shards adds them up, scanning a
    shard written before the count existed."""
    rng = np.random.default_rng(5)
    shards = [[random_trace(rng, length) for length in (9, 30)] for _ in range(2)]
    for index, traces in enumerate(shards):
        write(tmp_path / f"shard{index}", traces)
    meta = json.loads(meta_path(tmp_path / "shard1").read_text())
    del meta["counts"]["supervised_tokens_by_source"]  # an older shard: scanned instead
    meta_path(tmp_path / "shard1").write_text(json.dumps(meta))
    with TraceDatasetWriter(tmp_path / "merged", ALL_ARRAYS, topk=4) as writer:
        for index in range(2):
            writer.add_dataset(tmp_path / f"shard{index}")
        merged = writer.commit({"tokenizer": FINGERPRINT.__dict__})
    traces = shards[0] + shards[1]
    supervised = np.concatenate([t.source[t.loss_mask == 1] for t in traces])
    expected = dict(
        zip(("student", "teacher", "inserted"), np.bincount(supervised, minlength=4)[1:].tolist())
    )
    assert merged["counts"]["supervised_tokens_by_source"] == expected
    assert write(tmp_path / "one", traces)["counts"]["supervised_tokens_by_source"] == expected
