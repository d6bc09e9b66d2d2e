"""tools/inspect_traces.py's library side: aligned columns and dataset statistics."""

import numpy as np
import pytest

from megatron_dcod.data.inspect import dataset_summary, format_summary, format_trace
from megatron_dcod.data.trace_format import Trace, TraceDataset, TraceDatasetWriter

FINGERPRINT = {
    "name_or_path": "tok",
    "vocab_size": 50,
    "vocab_sha256": "a",
    "chat_template_sha256": "b",
}


class DigitTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" if i % 2 else "\n" for i in ids)


@pytest.fixture
def dataset(tmp_path):
    traces = [
        Trace(
            tokens=np.array([5, 6, 7], np.int32),
            loss_mask=np.array([0, 1, 1], np.uint8),
            teacher_logprobs=np.array([0, -0.5, -1.5], np.float32),
            source=np.array([0, 2, 1], np.uint8),
        ),
        Trace(
            tokens=np.array([1, 2, 3, 4, 9], np.int32),
            loss_mask=np.array([0, 0, 1, 1, 1], np.uint8),
            teacher_logprobs=np.array([0, 0, -1, -2, -3], np.float32),
            source=np.array([0, 0, 1, 1, 1], np.uint8),
        ),
    ]
    with TraceDatasetWriter(tmp_path / "ds", traces[0].present_arrays()) as writer:
        for trace in traces:
            writer.add(trace)
        writer.commit({"tokenizer": FINGERPRINT})
    return TraceDataset(tmp_path / "ds")


def test_trace_columns(dataset):
    lines = format_trace(dataset, 0, DigitTokenizer()).splitlines()
    assert lines[0].endswith("3 tokens, 2 supervised")
    assert lines[1].split() == ["pos", "token", "text", "mask", "logp_teacher", "source"]
    assert lines[2].split() == ["0", "5", "<5>", "0", "-", "prompt"]
    assert lines[3].split() == ["1", "6", "\\n", "1", "-0.5000", "teacher"]
    assert lines[4].split() == ["2", "7", "<7>", "1", "-1.5000", "student"]
    truncated = format_trace(dataset, 1, None, max_rows=2).splitlines()
    assert len(truncated) == 5 and truncated[-1] == "... 3 more tokens"


def test_summary_statistics(dataset):
    summary = dataset_summary(dataset)
    assert (summary["traces"], summary["tokens"], summary["supervised_tokens"]) == (2, 8, 5)
    assert summary["supervised_fraction"] == pytest.approx(5 / 8)
    assert summary["length"]["p50"] == pytest.approx(4.0)
    supervised_logprobs = [-0.5, -1.5, -1, -2, -3]
    assert summary["teacher_logprobs"]["mean"] == pytest.approx(np.mean(supervised_logprobs))
    assert summary["teacher_logprobs"]["p50"] == pytest.approx(np.median(supervised_logprobs))
    assert summary["teacher_logprobs"]["min"] == -3.0
    assert "teacher_logprobs" in format_summary(summary)
    assert summary["supervised_by_source"] == {"student": 4, "teacher": 1, "inserted": 0}
    assert dataset.meta["counts"]["supervised_tokens_by_source"] == summary["supervised_by_source"]
    assert "supervised_by_source" in format_summary(summary)
