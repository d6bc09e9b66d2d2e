"""Trace datasets → shuffled, packed, shifted training sequences."""

import numpy as np
from megatron.core.datasets.utils import Split

from megatron_dcod.config import TraceDataConfig
from megatron_dcod.data.sequences import TraceBlendConfig, TraceSequenceDataset, pack_greedily
from megatron_dcod.data.trace_format import TraceDataset, array_path_prefix
from tests.helpers.traces import write_synthetic_traces

ARRAYS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "ref_logprobs")


def sequences(prefix, seq=16, pack=True, seed=3, num_samples=None, arrays=ARRAYS):
    traces = TraceDataset(prefix)
    config = TraceBlendConfig(
        random_seed=seed,
        sequence_length=seq,
        split="100,0,0",
        trace=TraceDataConfig(seq, pack=pack, arrays=arrays),
    )
    return TraceSequenceDataset(
        traces, str(prefix), np.arange(len(traces)), num_samples, Split.train, config
    )


def test_pack_greedily():
    assert pack_greedily(np.array([3, 4, 2, 5, 5]), 8).tolist() == [0, 2, 4, 5]
    assert pack_greedily(np.array([8, 1]), 8).tolist() == [0, 1, 2]
    assert pack_greedily(np.array([], dtype=np.int64), 8).tolist() == [0]


def test_samples_are_shifted_traces(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "t", count=20, lengths=(3, 12), sources=True)
    traces, dataset = TraceDataset(prefix), sequences(prefix, arrays=ARRAYS + ("source",))
    seen = []
    for index in range(len(dataset)):
        sample = dataset[index]
        bin_traces = dataset.order[dataset.bin_starts[index] : dataset.bin_starts[index + 1]]
        start = 0
        for segment, trace_index in enumerate(bin_traces):
            trace, count = traces[int(trace_index)], len(traces[int(trace_index)].tokens) - 1
            span = slice(start, start + count)
            assert (sample["segment_ids"][span] == segment).all()
            np.testing.assert_array_equal(sample["tokens"][span], trace.tokens[:-1])
            np.testing.assert_array_equal(sample["labels"][span], trace.tokens[1:])
            np.testing.assert_array_equal(sample["loss_mask"][span], trace.loss_mask[1:])
            np.testing.assert_array_equal(sample["position_ids"][span], np.arange(count))
            for name in ARRAYS + ("source",):
                expected = getattr(trace, name)[1:].astype(sample[name].dtype)
                np.testing.assert_array_equal(sample[name][span], expected)
            start += count
            seen.append(int(trace_index))
        assert start <= 16 and not sample["loss_mask"][start:].any()
        assert sample["source"].dtype == np.uint8 and not sample["source"][start:].any()
        assert (sample["segment_ids"][start:] == len(bin_traces)).all()  # padding segment
    assert sorted(seen) == list(range(20))  # one epoch: every trace exactly once


def test_shuffle_is_seeded_and_epochs_repeat(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "t", count=30)
    first, again, other = sequences(prefix), sequences(prefix), sequences(prefix, seed=4)
    np.testing.assert_array_equal(first.order, again.order)
    assert not np.array_equal(first.order, other.order)
    padded = sequences(prefix, pack=False, num_samples=70)
    assert len(padded) == 90 and sorted(padded.order[30:60]) == list(range(30))  # 3 epochs
    assert len(sequences(prefix)) < 30  # packing puts several traces in a sequence


def test_long_traces_are_truncated_and_counted(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "t", count=10, lengths=(20, 40))
    dataset = sequences(prefix, seq=16, pack=False)
    assert dataset.truncated == 10
    sample = dataset[0]
    trace = TraceDataset(prefix)[int(dataset.order[0])]
    np.testing.assert_array_equal(sample["labels"], trace.tokens[1:17])


def test_samples_take_dtypes_from_the_format_and_are_not_revalidated(tmp_path):
    """Arrays keep their on-disk dtype (top-k log-probs float16); a value damaged after the
    dataset was written reaches the sample as stored: the loss drops such a micro-batch."""
    prefix = write_synthetic_traces(tmp_path / "t", count=5, lengths=(6, 7))
    values = np.memmap(array_path_prefix(prefix, "teacher_logprobs") + ".bin", np.float32, "r+")
    values[6 * 3 + 4] = np.nan  # trace 3, a supervised position
    values.flush()
    dataset = sequences(prefix, pack=False)
    sample = dataset[int(np.nonzero(dataset.order == 3)[0][0])]
    assert np.isnan(sample["teacher_logprobs"][3])  # element 4 of the trace, shifted by one
    assert sample["teacher_topk_logprobs"].dtype == np.float16
    assert sample["teacher_topk_ids"].dtype == np.int32 and sample["tokens"].dtype == np.int64


def test_sample_index_is_cached_with_data_cache_path(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "t", count=30)
    cache = tmp_path / "cache"

    def cached(pack=True):
        traces = TraceDataset(prefix)
        config = TraceBlendConfig(
            random_seed=3,
            sequence_length=16,
            split="100,0,0",
            path_to_cache=str(cache),
            trace=TraceDataConfig(16, pack=pack),
        )
        return TraceSequenceDataset(
            traces, str(prefix), np.arange(len(traces)), None, Split.train, config
        )

    first = cached()
    (index_file,) = cache.glob("*-trace_sequence_index.npz")
    np.testing.assert_array_equal(first.bin_starts, sequences(prefix, arrays=()).bin_starts)
    marked = first.order[::-1].copy()  # a cache entry that only a read can return
    np.savez(index_file, order=marked, bin_starts=first.bin_starts, truncated=first.truncated)
    again = cached()
    np.testing.assert_array_equal(again.order, marked)
    np.testing.assert_array_equal(again.bin_starts, first.bin_starts)
    unpacked = cached(pack=False)  # another layout: another cache entry
    assert len(list(cache.glob("*.npz"))) == 2 and len(unpacked) == 30
    assert index_file.exists()
