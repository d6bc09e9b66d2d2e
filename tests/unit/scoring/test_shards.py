"""The scorer's resumable shards (scoring/shards.py): files, the job key, failure markers."""

import os
import shutil

import numpy as np
import pytest

from megatron_dcod.data.trace_format import TraceDataset
from megatron_dcod.scoring.arguments import parse_config
from megatron_dcod.scoring.shards import ScoringJob, ShardFailed, checkpoint_identity
from tests.helpers.traces import write_synthetic_traces


@pytest.fixture
def job_parts(tmp_path):
    prefix = write_synthetic_traces(tmp_path / "data" / "traces", count=10)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "__0_0.distcp").write_bytes(np.arange(100_000, dtype=np.int32).tobytes())
    (checkpoint / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    flags = ["--hf-config=h", f"--load={checkpoint}", f"--data-path={prefix}", "--seq-length=64"]
    return TraceDataset(prefix), parse_config([*flags, "--shard-traces=4"]), checkpoint


def test_shards_are_dealt_to_ranks_and_skipped_once_saved(job_parts):
    dataset, config, checkpoint = job_parts
    job = ScoringJob(dataset, config, checkpoint)
    assert [(s.start, s.stop) for s in job.shards] == [(0, 4), (4, 8), (8, 10)]
    assert job.pending(0, 2) == [0, 2] and job.pending(1, 2) == [1]
    job.save(2, {"teacher_logprobs": np.zeros(job.tokens(2), np.float32)})
    assert job.pending(0, 2) == [0] and job.pending(0, 1) == [0, 1]
    assert job.load(2)["teacher_logprobs"].shape == (job.tokens(2),)
    assert not list(job.work.glob(".*")), "temporary shard files left"


def test_a_failed_rank_stops_the_wait(job_parts):
    job = ScoringJob(*job_parts)
    job.fail(3, "RuntimeError: out of memory")
    with pytest.raises(ShardFailed, match="failed-rank-3: RuntimeError: out of memory"):
        job.wait_for_all()
    job.clear_failures()
    for index in range(len(job.shards)):
        job.save(index, {"teacher_logprobs": np.zeros(job.tokens(index), np.float32)})
    job.wait_for_all()  # returns: every shard is there


def test_the_key_follows_contents_not_copies(job_parts, tmp_path):
    dataset, config, checkpoint = job_parts
    key = ScoringJob(dataset, config, checkpoint).key
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy, copy_function=shutil.copy)  # new modification times
    os.utime(copy / "metadata.json", (0, 0))
    assert checkpoint_identity(copy) == checkpoint_identity(checkpoint)
    assert ScoringJob(dataset, config, copy).key == key
    data = bytearray((copy / "__0_0.distcp").read_bytes())
    data[10] ^= 1  # other weights of the same size
    (copy / "__0_0.distcp").write_bytes(bytes(data))
    assert ScoringJob(dataset, config, copy).key != key
    other = parse_config([f"--hf-config=h", f"--load={checkpoint}", f"--data-path={dataset.prefix}",
                          "--seq-length=64", "--shard-traces=4", "--topk=2"])  # fmt: skip
    assert ScoringJob(dataset, other, checkpoint).key != key
