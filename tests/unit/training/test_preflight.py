"""Checks that must fail before step 1."""

import json
from argparse import Namespace

import pytest

from megatron_dcod.config import CorrectionConfig, TraceDataConfig
from megatron_dcod.data.trace_format import TraceFormatError, meta_path
from megatron_dcod.megatron import patches
from megatron_dcod.training.preflight import check_datasets, dataset_prefixes
from tests.helpers.traces import write_synthetic_traces


def data_config(correction):
    return TraceDataConfig(32, arrays=correction.required_arrays())


def test_dataset_prefixes_of_blends_and_per_split_paths():
    def args(**paths):
        defaults = dict(data_path=None, data_args_path=None, per_split_data_args_path=None)
        defaults |= dict(train_data_path=None, valid_data_path=None, test_data_path=None)
        return Namespace(**(defaults | paths))

    with patches.applied(patches.LIBRARY):  # Megatron's own blend parsing, megatron.training
        assert dataset_prefixes(args(data_path=["a"])) == ["a"]
        assert dataset_prefixes(args(data_path=["0.3", "a", "0.7", "b"])) == ["a", "b"]
        per_split = args(train_data_path=["t"], valid_data_path=["v"], test_data_path=["t"])
        assert dataset_prefixes(per_split) == ["t", "v"]
        with pytest.raises(ValueError, match="--data-path is required"):
            dataset_prefixes(args())


def test_accepts_and_adds_diagnostic_arrays(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "a", count=4)
    data, fingerprint = check_datasets([str(prefix)], data_config(CorrectionConfig()), 64)
    assert data.arrays == ("teacher_logprobs",) and fingerprint.vocab_size == 64
    kl = CorrectionConfig(weighting="dcod", base_loss="kl")
    data, _ = check_datasets([str(prefix)], data_config(kl), 64)
    assert data.arrays == ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def test_refusals(tmp_path):
    first = write_synthetic_traces(tmp_path / "a", count=4)
    with pytest.raises(TraceFormatError, match="does not fit the student's vocab_size 32"):
        check_datasets([str(first)], data_config(CorrectionConfig()), 32)
    other = write_synthetic_traces(tmp_path / "b", count=4, vocab=64)
    meta = json.loads(meta_path(other).read_text())
    meta["tokenizer"]["vocab_sha256"] = "f" * 64
    meta_path(other).write_text(json.dumps(meta))
    with pytest.raises(
        TraceFormatError, match=f"{other}: tokenizer mismatch in \\['vocab_sha256'\\]"
    ):
        check_datasets([str(first), str(other)], data_config(CorrectionConfig()), 64)
    with pytest.raises(TraceFormatError, match="no such trace dataset"):
        check_datasets([str(tmp_path / "missing")], data_config(CorrectionConfig()), 64)
    missing = data_config(CorrectionConfig(weighting="iw_sft"))
    bare = write_synthetic_traces(tmp_path / "c", count=4)
    meta = json.loads(meta_path(bare).read_text())
    meta["arrays"].remove("ref_logprobs")
    meta_path(bare).write_text(json.dumps(meta))
    with pytest.raises(TraceFormatError, match=r"the correction needs \['ref_logprobs'\]"):
        check_datasets([str(bare)], missing, 64)


def test_ids_beyond_the_vocabulary_are_refused(tmp_path):
    """The tokenizer claims 64 ids, the student has 64, but a trace holds id 70 (a dataset
    made with another tokenizer of the same size): the stored max id gives it away."""
    prefix = write_synthetic_traces(tmp_path / "a", count=4, vocab=72)
    meta = json.loads(meta_path(prefix).read_text())
    meta["tokenizer"]["vocab_size"] = 64
    meta_path(prefix).write_text(json.dumps(meta))
    largest = meta["stats"]["max_token_id"]
    assert largest >= 64
    with pytest.raises(TraceFormatError, match=f"tokens holds id {largest}, beyond"):
        check_datasets([str(prefix)], data_config(CorrectionConfig()), 64)
    del meta["stats"]["max_token_id"]  # a dataset written before the stat: scanned instead
    meta_path(prefix).write_text(json.dumps(meta))
    with pytest.raises(TraceFormatError, match=f"tokens holds id {largest}, beyond"):
        check_datasets([str(prefix)], data_config(CorrectionConfig()), 64)


def test_source_array_for_the_per_source_metrics_and_train_sources(tmp_path):
    """Loaded when every dataset has it; --dcod-train-sources other than all needs it."""
    with_sources = write_synthetic_traces(tmp_path / "a", count=4, sources=True)
    without = write_synthetic_traces(tmp_path / "b", count=4)
    data, _ = check_datasets([str(with_sources)], data_config(CorrectionConfig()), 64)
    assert data.arrays == ("teacher_logprobs", "source")
    data, _ = check_datasets([str(with_sources), str(without)], data_config(CorrectionConfig()), 64)
    assert data.arrays == ("teacher_logprobs",)  # a blend where one dataset lacks it
    teacher_only = CorrectionConfig(train_sources=("teacher",))
    data, _ = check_datasets([str(with_sources)], data_config(teacher_only), 64)
    assert data.arrays == ("source", "teacher_logprobs")
    with pytest.raises(TraceFormatError, match=f"{without}: the correction needs \\['source'\\]"):
        check_datasets([str(with_sources), str(without)], data_config(teacher_only), 64)
    with pytest.raises(TraceFormatError, match="--dcod-train-sources other than all needs the per"):
        check_datasets([str(without)], data_config(teacher_only), 64)
