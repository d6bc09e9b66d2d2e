"""Streaming safetensors writer and the sharded HF reader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dcod.checkpoint.hf_files import (
    HFCheckpointError,
    HFShardReader,
    PlannedTensor,
    StreamingSafetensorsWriter,
    plan_shards,
    shard_file_names,
    write_index,
)


def test_streamed_file_reads_back_bit_exact(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 3).to(torch.float16),
    }
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path / "model.safetensors", plan)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_writer_refuses_what_the_plan_does_not_hold(tmp_path):
    writer = StreamingSafetensorsWriter(
        tmp_path / "x.safetensors", [PlannedTensor("a", (2,), torch.float32)]
    )
    with pytest.raises(HFCheckpointError, match=r"got a \(3,\).*expected a \(2,\)"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(HFCheckpointError, match="1 tensors unwritten"):
        writer.close()


def test_shards_and_index(tmp_path):
    plan = [PlannedTensor(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    shards = plan_shards(plan, max_bytes=100)
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards([PlannedTensor("big", (100,), torch.float32)], 10)[0][0].name == "big"
    files = shard_file_names(len(shards))
    assert files[0] == "model-00001-of-00003.safetensors"
    write_index(tmp_path, shards, files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"


@pytest.fixture
def sharded_dir(tmp_path):
    save_file({"x": torch.arange(4.0)}, tmp_path / "part1.safetensors")
    save_file({"y": torch.ones(2, 3)}, tmp_path / "part2.safetensors")
    weight_map = {"x": "part1.safetensors", "y": "part2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_reader_reads_across_shards(sharded_dir):
    reader = HFShardReader(sharded_dir)
    assert reader.names() == {"x", "y"}
    x, y = reader.read(["x", "y"])
    assert torch.equal(x, torch.arange(4.0)) and torch.equal(y, torch.ones(2, 3))


def test_reader_names_missing_and_truncated_shards(sharded_dir):
    (sharded_dir / "part2.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="part2.safetensors: shard listed .* is missing"):
        HFShardReader(sharded_dir)
    save_file({"y": torch.ones(200, 3)}, sharded_dir / "part2.safetensors")
    size = (sharded_dir / "part2.safetensors").stat().st_size
    with open(sharded_dir / "part2.safetensors", "r+b") as file:
        file.truncate(size - 100)
    with pytest.raises(HFCheckpointError, match="part2.safetensors: unreadable safetensors"):
        HFShardReader(sharded_dir)
