"""HF checkpoint files, read and written one tensor at a time.

Reading: `model.safetensors` or shards listed in `model.safetensors.index.json`; each shard is
opened only while its tensors are copied out, so its pages leave memory again.

Writing: the `safetensors` package writes a file from a dict of tensors held in memory. To keep
at most one layer in memory, `StreamingSafetensorsWriter` writes the same format (8-byte
little-endian header length, JSON header with dtype/shape/byte offsets, raw little-endian
data) from a plan made in advance, tensor by tensor; safetensors reads it back (tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class HFCheckpointError(ValueError):
    """An HF checkpoint that cannot be read or does not match its config."""


class HFShardReader:
    """Tensors of an HF safetensors checkpoint (sharded or not) by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.file_of = self._weight_map()
        for file in sorted(set(self.file_of.values())):
            self._check_file(file)

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                return json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise HFCheckpointError(f"{index}: not a safetensors index ({error})") from error
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise HFCheckpointError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE}")
        with self._open(SINGLE_FILE) as handle:
            return {name: SINGLE_FILE for name in handle.keys()}

    def _open(self, file: str):
        path = self.directory / file
        if not path.is_file():
            raise HFCheckpointError(f"{path}: shard listed in the checkpoint is missing")
        try:
            return safe_open(str(path), framework="pt")
        except SafetensorError as error:  # truncated or corrupt header
            raise HFCheckpointError(f"{path}: unreadable safetensors file ({error})") from error

    def _check_file(self, file: str) -> None:
        with self._open(file) as handle:
            missing = {n for n, f in self.file_of.items() if f == file} - set(handle.keys())
        if missing:
            raise HFCheckpointError(f"{self.directory / file}: lacks {sorted(missing)[:5]}")

    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, names: Iterable[str]) -> list[torch.Tensor]:
        """Copies of the named tensors; the shard files are closed again afterwards."""
        names = list(names)
        absent = [name for name in names if name not in self.file_of]
        if absent:
            raise HFCheckpointError(f"{self.directory}: tensors {absent} are missing")
        tensors = {}
        for file in dict.fromkeys(self.file_of[name] for name in names):
            with self._open(file) as handle:
                for name in names:
                    if self.file_of[name] == file:
                        tensors[name] = handle.get_tensor(name).clone()
        return [tensors[name] for name in names]


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors arrive one by one, in the planned order."""

    def __init__(self, path: Path, plan: list[PlannedTensor]):
        self.path, self.plan, self.written = path, plan, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor in plan:
            header[tensor.name] = {
                "dtype": DTYPE_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self.written]
        if (name, tuple(tensor.shape), tensor.dtype) != (
            expected.name,
            expected.shape,
            expected.dtype,
        ):
            raise HFCheckpointError(
                f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{expected.name} {expected.shape} {expected.dtype}"
            )  # fmt: skip
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(data.numpy().data)
        self.written += 1

    @property
    def done(self) -> bool:
        return self.written == len(self.plan)

    def close(self) -> None:
        self.file.close()
        if not self.done:
            raise HFCheckpointError(
                f"{self.path}: {len(self.plan) - self.written} tensors unwritten"
            )


def write_index(directory: Path, shards: list[list[PlannedTensor]], files: list[str]) -> None:
    """`model.safetensors.index.json` for a sharded checkpoint (none for a single file)."""
    if len(files) == 1:
        return
    weight_map = {t.name: file for shard, file in zip(shards, files) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def expected_hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of the HF architecture (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def copy_template(template: Path, out: Path, hf_config, dtype: torch.dtype) -> None:
    """Tokenizer, generation config and other non-weight files; config.json with the dtype."""
    for path in sorted(template.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
    hf_config.dtype = dtype
    hf_config.save_pretrained(out)
