"""Traces → packed rows of `seq_length` tokens, and the rows' per-position results → traces.

A shard's traces are packed first-fit by decreasing length, so rows are full and each trace lies
in one row. Every trace is its own attention segment (attention stays inside it, positions
restart at 0), as the trainer packs (training/batch.py); the rest of a row is one padding
segment. Rows are grouped into micro-batches of equal shape (the pipeline sends fixed shapes),
the last one completed with padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PADDING_SEGMENT = 0  # segment id of padding; trace segments are 1, 2, ...


@dataclass(frozen=True)
class Placement:
    """Where one trace lies in the packed rows."""

    trace: int
    """Index of the trace in the shard's list."""
    row: int
    offset: int
    """First token's position in the row."""
    length: int


@dataclass
class PackedShard:
    """The packed rows of one shard and where each trace went."""

    tokens: np.ndarray  # [rows, s] int64
    segment_ids: np.ndarray  # [rows, s] int64, PADDING_SEGMENT on padding
    position_ids: np.ndarray  # [rows, s] int64, restarting at 0 per trace
    placements: list[Placement]

    def micro_batches(self, rows: int) -> list[slice]:
        """Row slices of `rows` rows each (the rows are already a multiple of `rows`)."""
        return [slice(start, start + rows) for start in range(0, len(self.tokens), rows)]


def first_fit_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of the traces in each row: decreasing length, each into the first row with room.

    lengths [n], each ≤ capacity."""
    rows: list[list[int]] = []
    room = np.zeros(0, dtype=np.int64)  # [rows] free tokens of each row
    for index in np.argsort(-lengths, kind="stable").tolist():
        fits = np.flatnonzero(room >= lengths[index])
        if len(fits):
            row = int(fits[0])
        else:
            row = len(rows)
            rows.append([])
            room = np.append(room, capacity)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_shard(traces: list[np.ndarray], seq_length: int, rows_per_micro_batch: int) -> PackedShard:
    """Pack token arrays [T] (each T ≤ seq_length) into rows of seq_length tokens."""
    lengths = np.array([len(tokens) for tokens in traces], dtype=np.int64)  # [n]
    rows = first_fit_rows(lengths, seq_length)
    total_rows = -(-max(len(rows), 1) // rows_per_micro_batch) * rows_per_micro_batch
    tokens = np.zeros((total_rows, seq_length), dtype=np.int64)  # [rows, s]
    segment_ids = np.full_like(tokens, PADDING_SEGMENT)
    position_ids = np.zeros_like(tokens)
    placements = []
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            length = int(lengths[index])
            tokens[row, offset : offset + length] = traces[index]
            segment_ids[row, offset : offset + length] = len(placements) + 1
            position_ids[row, offset : offset + length] = np.arange(length)
            placements.append(Placement(index, row, offset, length))
            offset += length
        position_ids[row, offset:] = np.arange(seq_length - offset)
    return PackedShard(tokens, segment_ids, position_ids, placements)


def unpack(values: np.ndarray, placement: Placement, loss_mask: np.ndarray) -> np.ndarray:
    """One trace's results from per-position values [rows, s, ...] of the packed rows.

    Position j of a row holds the score of the row's token j+1 (predicted from tokens ≤ j), so
    element i of the trace (log p(token_i | tokens_<i), the dataset's alignment rule) is at row
    position offset + i − 1. Element 0 and unsupervised elements are 0."""
    start = placement.offset
    trace = np.zeros((placement.length, *values.shape[2:]), dtype=values.dtype)  # [T, ...]
    trace[1:] = values[placement.row, start : start + placement.length - 1]
    trace[~loss_mask.astype(bool)] = 0
    return trace
