"""Arrays added to an existing dataset (data/trace_update.py): the other files untouched,
meta.json last, stale top-k removed, nothing left behind by an aborted or failed add."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from megatron_dcod.data.trace_format import TraceDataset, TraceFormatError
from megatron_dcod.data.trace_update import ArrayAdder
from tests.helpers.traces import TOPK, write_synthetic_traces


def digests(prefix: Path, names: list[str]) -> dict[str, str]:
    return {
        name: hashlib.sha256(Path(f"{prefix}_{name}{suffix}").read_bytes()).hexdigest()
        for name in names
        for suffix in (".bin", ".idx")
    }


def new_values(dataset: TraceDataset, first: int, count: int, k: int) -> dict[str, np.ndarray]:
    traces = [dataset[i] for i in range(first, first + count)]
    logprobs = np.concatenate([-0.5 * t.loss_mask.astype(np.float32) for t in traces])  # [n]
    values = {"teacher_logprobs": logprobs}
    if k:
        ids = np.concatenate([np.stack([t.tokens] * k, 1) for t in traces]).astype(np.int32)
        values["teacher_topk_ids"] = ids  # [n, k]
        values["teacher_topk_logprobs"] = np.full(ids.shape, -1.0, np.float32)
    return values


@pytest.mark.parametrize("k", [2, 0], ids=["new-topk", "no-topk"])
def test_replaced_teacher_arrays(tmp_path, k):
    prefix = write_synthetic_traces(tmp_path / "traces", count=12)
    before = TraceDataset(prefix)
    kept = ["tokens", "loss_mask", "ref_logprobs"]
    untouched = digests(prefix, kept)
    arrays = ("teacher_logprobs",) + (("teacher_topk_ids", "teacher_topk_logprobs") if k else ())
    with ArrayAdder(prefix, arrays, topk=k) as adder:
        adder.add(new_values(before, 0, 5, k), traces=5)
        adder.add(new_values(before, 5, 7, k), traces=7)
        remove = () if k else ("teacher_topk_ids", "teacher_topk_logprobs")
        meta = adder.commit({"teacher_logprobs_from": "model"}, remove)
    after = TraceDataset(prefix)
    assert digests(prefix, kept) == untouched
    assert after.meta == meta and meta["teacher_logprobs_from"] == "model"
    assert meta["topk"] == k and after.has("teacher_topk_ids") == bool(k)
    assert not Path(f"{prefix}_teacher_topk_ids.bin").exists() or k
    for index in range(12):
        trace, original = after[index], before[index]
        np.testing.assert_array_equal(trace.teacher_logprobs, -0.5 * original.loss_mask)
        if k:
            np.testing.assert_array_equal(trace.teacher_topk_ids[:, 0], original.tokens)
    supervised = meta["counts"]["supervised_tokens"]
    assert meta["stats"]["teacher_logprob_mean"] == pytest.approx(-0.5 * supervised / supervised)
    assert meta["stats"]["max_topk_id"] == (int(before.flat("tokens").max()) if k else -1)
    assert not list(tmp_path.glob(".*")), "temporary files left"


def test_aborted_or_incomplete_add_leaves_the_dataset_as_it_was(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "traces", count=6)
    dataset = TraceDataset(prefix)
    meta_before = Path(f"{prefix}.meta.json").read_text()
    with pytest.raises(RuntimeError):
        with ArrayAdder(prefix, ("teacher_logprobs",)) as adder:
            adder.add(new_values(dataset, 0, 3, 0), traces=3)
            raise RuntimeError("killed")
    with pytest.raises(TraceFormatError, match="values for 3 of 6 traces"):
        with ArrayAdder(prefix, ("teacher_logprobs",)) as adder:
            adder.add(new_values(dataset, 0, 3, 0), traces=3)
            adder.commit({})
    with pytest.raises(TraceFormatError, match="shape"):
        with ArrayAdder(prefix, ("teacher_logprobs",)) as adder:
            adder.add(new_values(dataset, 0, 3, 0), traces=2)
    assert Path(f"{prefix}.meta.json").read_text() == meta_before
    assert not list(tmp_path.glob(".*"))
    assert TraceDataset(prefix).topk == TOPK


def test_killed_between_meta_writes_leaves_a_readable_dataset(tmp_path, monkeypatch):
    """A stop after meta.json dropped the replaced arrays and before the new ones are renamed
    in: the dataset reads, without them (not with another model's statistics); a rerun adds
    them."""
    from megatron_dcod.data import trace_update

    prefix = write_synthetic_traces(tmp_path / "traces", count=6)
    dataset = TraceDataset(prefix)

    replace, calls = trace_update.os.replace, []

    def killed(*args):  # the first rename is meta.json without the replaced arrays
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt
        replace(*args)

    arrays = ("teacher_logprobs",)
    with monkeypatch.context() as patch:
        patch.setattr(trace_update.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            with ArrayAdder(prefix, arrays) as adder:
                adder.add(new_values(dataset, 0, 6, 0), traces=6)
                adder.commit({}, remove=("teacher_topk_ids", "teacher_topk_logprobs"))
    survived = TraceDataset(prefix)
    assert not survived.has("teacher_logprobs") and not survived.has("teacher_topk_ids")
    assert survived.meta["stats"]["teacher_logprob_mean"] is None and survived.topk == 0
    assert survived.has("ref_logprobs") and len(survived) == 6
    with ArrayAdder(prefix, arrays) as adder:
        adder.add(new_values(dataset, 0, 6, 0), traces=6)
        adder.commit({"teacher_logprobs_from": "model"})
    assert TraceDataset(prefix).has("teacher_logprobs")
