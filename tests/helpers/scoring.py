"""`python -m megatron_dcod.score` as the tests run it: in-process on gloo ranks, or as a
subprocess that reports each shard it saves and can be killed (SIGKILL) right after one."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

from megatron_dcod.data.trace_format import TraceDatasetWriter

KILL_AFTER_SHARD = "DCOD_TEST_KILL_AFTER_SHARD"
"""Environment variable: the subprocess kills itself once this shard index is saved."""


def write_untaught_traces(prefix: Path, fingerprint: dict, vocab: int, count: int = 40) -> Path:
    """Traces of tokens and loss mask only (no teacher arrays), lengths 2..60, random masks."""
    rng = np.random.default_rng(7)
    with TraceDatasetWriter(prefix, ("tokens", "loss_mask")) as writer:
        from megatron_dcod.data.trace_format import Trace

        for index in range(count):
            length = 2 if index == 0 else int(rng.integers(3, 61))
            tokens = rng.integers(0, vocab, length).astype(np.int32)  # [T]
            mask = (rng.random(length) < 0.8).astype(np.uint8)
            mask[0], mask[-1] = 0, 1
            writer.add(Trace(tokens=tokens, loss_mask=mask))
        writer.commit({"tokenizer": fingerprint})
    return prefix


def score_each(runs: list[list[str]]) -> None:
    """`megatron_dcod.score.main(argv)` for each argv, on the ranks of run_distributed_test."""
    from megatron_dcod import score

    for argv in runs:
        score.main(argv)


def main() -> None:
    """The scorer's entry, printing `saved shard N` as each shard file lands."""
    from megatron_dcod import score
    from megatron_dcod.scoring import shards

    save = shards.ScoringJob.save
    kill_after = os.environ.get(KILL_AFTER_SHARD)

    def reporting_save(job, index, values):
        save(job, index, values)
        sys.stdout.write(f"saved shard {index}\n")  # one write: ranks share the pipe
        sys.stdout.flush()
        if kill_after is not None and index == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    shards.ScoringJob.save = reporting_save
    score.main(sys.argv[1:])


if __name__ == "__main__":
    main()
