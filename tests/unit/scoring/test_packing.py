"""Packing traces into rows and reading their scores back (scoring/packing.py)."""

import numpy as np

from megatron_dcod.scoring.packing import PADDING_SEGMENT, first_fit_rows, pack_shard, unpack


def test_first_fit_places_every_trace_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 33, 200)
    rows = first_fit_rows(lengths, 32)
    placed = sorted(index for row in rows for index in row)
    assert placed == list(range(200))
    assert all(lengths[row].sum() <= 32 for row in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 32 * 1.25))  # near-full rows


def test_packed_rows_hold_each_trace_with_its_own_segment_and_positions():
    rng = np.random.default_rng(1)
    traces = [rng.integers(1, 50, length) for length in (5, 16, 3, 9, 1, 12)]
    packed = pack_shard(traces, seq_length=16, rows_per_micro_batch=2)
    assert packed.tokens.shape[0] % 2 == 0 and packed.tokens.shape[1] == 16
    segments = set()
    for placement in packed.placements:
        span = slice(placement.offset, placement.offset + placement.length)
        np.testing.assert_array_equal(packed.tokens[placement.row, span], traces[placement.trace])
        np.testing.assert_array_equal(
            packed.position_ids[placement.row, span], np.arange(placement.length)
        )
        (segment,) = set(packed.segment_ids[placement.row, span].tolist())
        assert segment != PADDING_SEGMENT and segment not in segments
        segments.add(segment)
    assert sorted(p.trace for p in packed.placements) == list(range(len(traces)))
    used = sum(len(t) for t in traces)
    assert (packed.segment_ids == PADDING_SEGMENT).sum() == packed.tokens.size - used


def test_unpack_applies_the_alignment_rule():
    """Row position j scores the row's token j+1: trace element i comes from offset + i − 1;
    element 0 and unsupervised elements are 0."""
    traces = [np.arange(10, 15), np.arange(20, 23)]
    packed = pack_shard(traces, seq_length=8, rows_per_micro_batch=1)
    scores = -np.roll(packed.tokens, -1, axis=1).astype(np.float32)  # "score" = −next token
    for placement in packed.placements:
        tokens = traces[placement.trace]
        mask = np.ones(len(tokens), np.uint8)
        mask[0], mask[2 % len(tokens)] = 0, 0
        expected = np.where(mask.astype(bool), -tokens, 0).astype(np.float32)
        np.testing.assert_array_equal(unpack(scores, placement, mask), expected)
