"""One dataset's scoring job: resumable shards in a work dir, merged into the dataset at the end.

The dataset's traces are cut into shards of `--shard-traces` consecutive traces, dealt to the
data-parallel ranks in turn (shard j to rank j mod DP). A finished shard is one `.npz` file of
its traces' values concatenated, written under a temporary name, flushed to disk and renamed,
so a file that exists is complete: a rerun after a kill (any DP size) skips those shards. The
work dir sits beside the dataset (on a file system every rank sees), named after a key of what
the values depend on: the dataset, the checkpoint's files, the role, top-k, dtype and shard
size. A rank that fails leaves a marker there, so the merging rank stops waiting and says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import megatron_dcod
from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.scoring.config import ScoreConfig

logger = logging.getLogger(__name__)

POLL_SECONDS = (0.05, 2.0)
"""How often the merging rank looks for the other ranks' finished shards: at first, and at most
(the interval doubles while it waits)."""
SAMPLED_BYTES = 2**16
"""Of each checkpoint file the identity hashes the first and the last this many bytes (all of a
smaller file): two checkpoints of one architecture differ there, and a copy does not."""


def _dataset_identity(dataset: TraceDataset) -> dict:
    """What identifies the traces: the build key, the counts and the tokens file's size."""
    tokens = Path(f"{dataset.prefix}_tokens.bin").stat()
    return {
        "build_key": dataset.meta.get("build_key"),
        "counts": dataset.meta["counts"],
        "tokens_bytes": tokens.st_size,
    }


def checkpoint_identity(directory: Path) -> list:
    """Name, size and a sha256 of the head and tail of each of a checkpoint's files: another
    checkpoint written to the same path changes it, a copy elsewhere (new modification times)
    does not."""
    identity = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            digest.update(handle.read(SAMPLED_BYTES))
            if size > 2 * SAMPLED_BYTES:
                handle.seek(size - SAMPLED_BYTES)
            digest.update(handle.read())
        identity.append([str(file.relative_to(directory)), size, digest.hexdigest()])
    return identity


class ShardFailed(RuntimeError):
    """Another rank failed; its message is in the work dir."""


@dataclass
class ScoringJob:
    """The shards of one dataset and the files that record which are done."""

    dataset: TraceDataset
    config: ScoreConfig
    checkpoint_dir: Path
    """The resolved iteration / release dir of `--load`."""

    def __post_init__(self) -> None:
        described = {
            "code_version": megatron_dcod.__version__,
            "dataset": _dataset_identity(self.dataset),
            "checkpoint": checkpoint_identity(self.checkpoint_dir),
            "role": self.config.role,
            "topk": self.config.topk,
            "dtype": self.config.dtype,
            "shard_traces": self.config.shard_traces,
        }
        self.key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        prefix = Path(self.dataset.prefix)
        self.work = prefix.parent / f".{prefix.name}.score-{self.config.role}-{self.key[:16]}"
        size, count = self.config.shard_traces, len(self.dataset)
        self.shards = [range(s, min(s + size, count)) for s in range(0, count, size)]

    def is_done(self) -> bool:
        """Whether the dataset already holds this job's arrays (a rerun after success)."""
        scored = self.dataset.meta.get("scoring", {}).get(self.config.role, {})
        arrays = all(self.dataset.has(name) for name in self.config.arrays)
        return arrays and scored.get("job_key") == self.key

    def remove_stale(self) -> None:
        """Delete the work dirs of other scoring jobs of this dataset and role (after this job
        merged: until then another key's shards may still be wanted)."""
        prefix = Path(self.dataset.prefix)
        for stale in prefix.parent.glob(f".{prefix.name}.score-{self.config.role}-*"):
            if stale != self.work:
                shutil.rmtree(stale, ignore_errors=True)

    def shard_file(self, index: int) -> Path:
        return self.work / f"shard-{index:06d}.npz"

    def pending(self, data_parallel_rank: int, data_parallel_size: int) -> list[int]:
        """This rank's shards that no earlier run finished."""
        return [
            index
            for index in range(data_parallel_rank, len(self.shards), data_parallel_size)
            if not self.shard_file(index).exists()
        ]

    def tokens(self, index: int) -> int:
        shard = self.shards[index]
        return int(self.dataset.lengths[shard.start : shard.stop].sum())

    def save(self, index: int, values: dict[str, np.ndarray]) -> None:
        """One finished shard: written under a temporary name, flushed, then renamed."""
        self.work.mkdir(parents=True, exist_ok=True)
        temp = self.work / f".{self.shard_file(index).name}.{uuid.uuid4().hex}.npz"
        with open(temp, "wb") as handle:
            np.savez(handle, **values)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.shard_file(index))

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.shard_file(index)) as values:
            return {name: values[name] for name in values.files}

    def fail(self, rank: int, message: str) -> None:
        """Leave the reason this rank stopped where the merging rank looks."""
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / f"failed-rank-{rank}.txt").write_text(message)

    def clear_failures(self) -> None:
        for marker in self.work.glob("failed-rank-*.txt"):
            marker.unlink(missing_ok=True)

    def wait_for_all(self) -> None:
        """Block until every shard's file exists; ShardFailed if a rank left a failure marker."""
        last_report, interval = time.monotonic(), POLL_SECONDS[0]
        while missing := [i for i in range(len(self.shards)) if not self.shard_file(i).exists()]:
            failures = sorted(self.work.glob("failed-rank-*.txt"))
            if failures:
                reasons = "; ".join(f"{f.stem}: {f.read_text()}" for f in failures)
                raise ShardFailed(f"{self.dataset.prefix}: {reasons}")
            if time.monotonic() - last_report > 60:
                waiting = f"waiting for {len(missing)} shards of other ranks in {self.work}"
                logger.info("%s: %s", self.dataset.prefix, waiting)
                last_report = time.monotonic()
            time.sleep(interval)
            interval = min(2 * interval, POLL_SECONDS[1])

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
