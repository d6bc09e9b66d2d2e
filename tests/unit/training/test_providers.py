"""Checks that must fail before step 1."""

import json

import pytest

from megatron_dcod.config import CorrectionConfig, TraceDataConfig
from megatron_dcod.data.trace_format import TraceFormatError, meta_path
from megatron_dcod.training.providers import blend_prefixes, preflight
from tests.helpers.traces import write_synthetic_traces


def data_config(correction):
    return TraceDataConfig(32, arrays=correction.required_arrays())


def test_blend_prefixes():
    assert blend_prefixes(["a"]) == ["a"]
    assert blend_prefixes(["0.3", "a", "0.7", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="--data-path is required"):
        blend_prefixes(None)


def test_preflight_accepts_and_adds_diagnostic_arrays(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "a", count=4)
    data, fingerprint = preflight([str(prefix)], data_config(CorrectionConfig()), 64)
    assert data.arrays == ("teacher_logprobs",) and fingerprint.vocab_size == 64
    kl = CorrectionConfig(weighting="dcod", base_loss="kl")
    data, _ = preflight([str(prefix)], data_config(kl), 64)
    assert data.arrays == ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def test_preflight_refusals(tmp_path):
    first = write_synthetic_traces(tmp_path / "a", count=4)
    with pytest.raises(TraceFormatError, match="does not fit the student's vocab_size 32"):
        preflight([str(first)], data_config(CorrectionConfig()), 32)
    other = write_synthetic_traces(tmp_path / "b", count=4, vocab=64)
    meta = json.loads(meta_path(other).read_text())
    meta["tokenizer"]["vocab_sha256"] = "f" * 64
    meta_path(other).write_text(json.dumps(meta))
    with pytest.raises(
        TraceFormatError, match=f"{other}: tokenizer mismatch in \\['vocab_sha256'\\]"
    ):
        preflight([str(first), str(other)], data_config(CorrectionConfig()), 64)
    with pytest.raises(TraceFormatError, match="no such trace dataset"):
        preflight([str(tmp_path / "missing")], data_config(CorrectionConfig()), 64)
