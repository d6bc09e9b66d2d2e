"""The on-disk trace dataset (docs/data_format.md): the one home of its layout, writer, reader.

A dataset is a set of files sharing a prefix. Every per-token array is a megatron-core indexed
dataset (`{prefix}_{name}.bin` + `.idx`) holding exactly one sequence per trace, and
`{prefix}.meta.json` describes the whole. Alignment rule: element i describes token i as the
prediction target given the tokens before it; element 0 is never supervised.

Top-k arrays hold k values per token, flattened: their sequence i has k × len(trace i) elements.
The indexed-dataset format has no float16 code, so float16 arrays are stored with the uint16
code and read back as float16 by reinterpreting the bits (no conversion, no loss).

megatron-core is imported where datasets are opened, not at module import: tokenizer workers
use Trace and validate_trace without loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from megatron_dcod.data.sources import SOURCE_NAMES, source_error  # noqa: F401 (re-export)
from megatron_dcod.data.trace_stats import TraceStats

FORMAT_VERSION = 1
# megatron-core warns on every index it opens outside torch.distributed; a data tool has no rank
warnings.filterwarnings("ignore", message="Could not determine rank", category=UserWarning)
META_SUFFIX = ".meta.json"
SIDECAR_SUFFIX = ".sidecar.jsonl"


class TraceFormatError(ValueError):
    """A trace dataset, or a trace written to one, breaks the format (docs/data_format.md)."""


@dataclass(frozen=True)
class ArraySpec:
    """How one per-token array is stored."""

    dtype: type
    """The dtype of the values as readers see them."""
    per_token: str
    """"scalar": one value per token; "topk": k values per token."""

    @property
    def storage_dtype(self) -> type:
        """The indexed-dataset dtype the values are written with (float16 travels as uint16)."""
        return np.uint16 if self.dtype is np.float16 else self.dtype


ARRAY_SPECS: dict[str, ArraySpec] = {
    "tokens": ArraySpec(np.int32, "scalar"),
    "loss_mask": ArraySpec(np.uint8, "scalar"),
    "teacher_logprobs": ArraySpec(np.float32, "scalar"),
    "teacher_topk_ids": ArraySpec(np.int32, "topk"),
    "teacher_topk_logprobs": ArraySpec(np.float16, "topk"),
    "ref_logprobs": ArraySpec(np.float32, "scalar"),
    "source": ArraySpec(np.uint8, "scalar"),
}
REQUIRED_ARRAYS = ("tokens", "loss_mask")
LOGPROB_ARRAYS = ("teacher_logprobs", "teacher_topk_logprobs", "ref_logprobs")


@dataclass
class Trace:
    """One trace: prompt + response tokens of the student tokenizer and their per-token arrays."""

    tokens: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] uint8, 1 on supervised targets
    teacher_logprobs: np.ndarray | None = None  # [T] float32, log π_T(token_i | tokens_<i)
    teacher_topk_ids: np.ndarray | None = None  # [T, k] int32
    teacher_topk_logprobs: np.ndarray | None = None  # [T, k] float16
    ref_logprobs: np.ndarray | None = None  # [T] float32, log π_0(token_i | tokens_<i)
    source: np.ndarray | None = None  # [T] uint8 SOURCE_NAMES: 0 unsupervised, 1-3 who wrote it

    def present_arrays(self) -> tuple[str, ...]:
        """Names of the arrays this trace carries, in ARRAY_SPECS order."""
        return tuple(name for name in ARRAY_SPECS if getattr(self, name) is not None)

    def truncated(self, max_length: int) -> "Trace":
        """The first `max_length` tokens, with every array cut the same way."""
        return Trace(**{name: getattr(self, name)[:max_length] for name in self.present_arrays()})


def validate_trace(trace: Trace) -> None:
    """Raise TraceFormatError if `trace` breaks the alignment rule or carries impossible values."""
    length = len(trace.tokens)
    if length == 0:
        raise TraceFormatError("empty trace")
    if trace.loss_mask[0]:
        raise TraceFormatError("element 0 is supervised; nothing precedes it to predict from")
    if not trace.loss_mask.any():
        raise TraceFormatError("no supervised token")
    for name in trace.present_arrays():
        values = getattr(trace, name)
        if values.shape[0] != length:
            raise TraceFormatError(f"{name} has {values.shape[0]} positions for {length} tokens")
        if name in LOGPROB_ARRAYS:
            _check_logprobs(name, values)
    if trace.source is not None and (error := source_error(trace.source, trace.loss_mask)):
        raise TraceFormatError(error)
    if trace.teacher_topk_ids is not None and trace.teacher_topk_ids.ndim != 2:
        raise TraceFormatError("teacher_topk_ids must be [tokens, k]")


def _check_logprobs(name: str, logprobs: np.ndarray) -> None:
    bad = ~np.isfinite(logprobs) | (logprobs > 0)
    if bad.any():
        position = int(np.argwhere(bad)[0][0])
        value = logprobs[position].tolist()
        raise TraceFormatError(f"{name} at token {position} is {value}: must be finite and <= 0")


@dataclass(frozen=True)
class TokenizerFingerprint:
    """What identifies a tokenizer for the purpose of reading token ids back."""

    name_or_path: str
    vocab_size: int
    vocab_sha256: str
    chat_template_sha256: str | None

    @classmethod
    def of(cls, tokenizer: Any, chat_template: str | None) -> "TokenizerFingerprint":
        """Fingerprint an HF tokenizer together with the chat template used to render traces."""
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        return cls(
            name_or_path=str(tokenizer.name_or_path),
            vocab_size=len(tokenizer),
            vocab_sha256=_sha256_text(json.dumps(vocab, ensure_ascii=False)),
            chat_template_sha256=None if chat_template is None else _sha256_text(chat_template),
        )

    def mismatches(self, other: "TokenizerFingerprint") -> list[str]:
        """The fields (other than the path) in which two fingerprints differ."""
        compared = ("vocab_size", "vocab_sha256", "chat_template_sha256")
        return [name for name in compared if getattr(self, name) != getattr(other, name)]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_path_prefix(prefix: str | os.PathLike, name: str) -> str:
    """The indexed-dataset prefix of one array: `{prefix}_{name}` (+ `.bin` / `.idx`)."""
    return f"{prefix}_{name}"


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def dataset_files(prefix: str | os.PathLike, arrays: Iterable[str] = ARRAY_SPECS) -> list[Path]:
    """Every file a dataset with these arrays consists of (existing or not)."""
    files = [meta_path(prefix), Path(f"{prefix}{SIDECAR_SUFFIX}")]
    for name in arrays:
        files += [Path(array_path_prefix(prefix, name) + ext) for ext in (".bin", ".idx")]
    return files


class TraceDatasetWriter:
    """Writes traces under temporary names; `commit` renames them into place, meta.json last.

    Use as a context manager: leaving the block without `commit` (an exception included)
    deletes everything written, so nothing partial ever sits at the prefix.
    """

    def __init__(self, prefix: str | os.PathLike, arrays: Iterable[str], topk: int = 0):
        self.prefix = Path(prefix)
        self.arrays = tuple(name for name in ARRAY_SPECS if name in set(arrays))
        unknown = set(arrays) - set(ARRAY_SPECS)
        if unknown or not set(REQUIRED_ARRAYS) <= set(self.arrays):
            raise TraceFormatError(f"bad array set {sorted(arrays)}; unknown: {sorted(unknown)}")
        self.topk = topk
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._temp_prefix = self.prefix.parent / f".{self.prefix.name}.partial-{uuid.uuid4().hex}"
        builder = indexed_dataset_module().IndexedDatasetBuilder
        self._builders = {
            name: builder(
                array_path_prefix(self._temp_prefix, name) + ".bin", ARRAY_SPECS[name].storage_dtype
            )
            for name in self.arrays
        }
        self._sidecar = open(f"{self._temp_prefix}{SIDECAR_SUFFIX}", "w", encoding="utf-8")
        self._committing = False
        self.stats = TraceStats()

    def __enter__(self) -> "TraceDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._builders or self._committing:
            self.abort()

    def add(self, trace: Trace, sidecar: dict[str, Any] | None = None) -> None:
        """Append one trace (validated) and its sidecar record (free metadata, may be empty)."""
        import torch  # loaded with megatron-core by __init__; add_item takes tensors

        validate_trace(trace)  # every check before the first byte is written
        if trace.present_arrays() != self.arrays:
            raise TraceFormatError(f"trace carries {trace.present_arrays()}, dataset {self.arrays}")
        for name in self.arrays:
            shape = getattr(trace, name).shape
            if ARRAY_SPECS[name].per_token == "topk" and shape[1:] != (self.topk,):
                raise TraceFormatError(f"{name} has shape {shape}, expected k={self.topk}")
        for name, builder in self._builders.items():
            values = getattr(trace, name)
            if ARRAY_SPECS[name].dtype is np.float16:  # below its range is −inf: clamp (p = 0)
                values = np.maximum(values, np.finfo(np.float16).min)
            values = np.ascontiguousarray(values, dtype=ARRAY_SPECS[name].dtype)
            stored = values.reshape(-1).view(ARRAY_SPECS[name].storage_dtype)
            builder.add_item(torch.from_numpy(stored if stored.flags.writeable else stored.copy()))
            builder.end_document()
        self._sidecar.write(json.dumps(sidecar or {}, ensure_ascii=False) + "\n")
        self.stats.add(trace)

    def add_dataset(self, prefix: str | os.PathLike) -> None:
        """Append every trace of a finished dataset with the same arrays (a resumable shard)."""
        dataset = TraceDataset(prefix)
        if tuple(dataset.meta["arrays"]) != self.arrays or dataset.topk != self.topk:
            raise TraceFormatError(f"{prefix}: arrays / top-k differ from {self.arrays}")
        for name, builder in self._builders.items():
            builder.add_index(array_path_prefix(prefix, name))  # copies .bin, extends the index
        with open(f"{prefix}{SIDECAR_SUFFIX}", encoding="utf-8") as sidecar:
            shutil.copyfileobj(sidecar, self._sidecar)
        self.stats.add_dataset(dataset)

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Finish the index files, write meta.json and move the dataset into place."""
        self._committing = True
        for name, builder in self._builders.items():
            builder.finalize(array_path_prefix(self._temp_prefix, name) + ".idx")
        self._builders = {}
        self._sidecar.close()
        full_meta = {
            "format_version": FORMAT_VERSION,
            "arrays": list(self.arrays),
            "topk": self.topk,
            **self.stats.summary(),
            **meta,
        }
        meta_path(self._temp_prefix).write_text(json.dumps(full_meta, indent=2) + "\n")
        remove_dataset(self.prefix)
        for temp, final in zip(
            dataset_files(self._temp_prefix, self.arrays), dataset_files(self.prefix, self.arrays)
        ):
            if temp.name.endswith(META_SUFFIX):
                continue
            os.replace(temp, final)
        os.replace(meta_path(self._temp_prefix), meta_path(self.prefix))
        self._committing = False
        return full_meta

    def abort(self) -> None:
        """Delete everything this writer wrote."""
        for builder in self._builders.values():
            builder.data_file.close()
        self._builders = {}
        self._sidecar.close()
        for path in dataset_files(self._temp_prefix, self.arrays):
            path.unlink(missing_ok=True)
        if self._committing:  # failed half-way through the renames: leave nothing at the prefix
            remove_dataset(self.prefix)


def indexed_dataset_module() -> Any:
    """megatron-core's indexed dataset module, imported without its "no TE/Apex" warnings (the
    import takes seconds; the writer pays it when it opens its files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def remove_dataset(prefix: str | os.PathLike) -> None:
    """Delete a dataset's files, meta.json first so that a half-removed dataset never reads."""
    for path in dataset_files(prefix):
        path.unlink(missing_ok=True)


def read_meta(prefix: str | os.PathLike) -> dict[str, Any]:
    """Load `{prefix}.meta.json`, refusing a missing file or another format version."""
    path = meta_path(prefix)
    if not path.is_file():
        raise TraceFormatError(f"{path}: no such trace dataset (meta.json missing)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise TraceFormatError(
            f"{path}: format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    return meta


def check_tokenizer(meta: dict[str, Any], expected: TokenizerFingerprint, where: str) -> None:
    """Refuse a dataset tokenized with another tokenizer (or chat template) than `expected`."""
    stored = TokenizerFingerprint(**meta["tokenizer"])
    differing = expected.mismatches(stored)
    if differing:
        raise TraceFormatError(
            f"{where}: tokenizer mismatch in {differing}: dataset {asdict(stored)}, "
            f"run {asdict(expected)}"
        )


class TraceDataset:
    """Read-only view of a trace dataset; `dataset[i]` returns a Trace of numpy views (no copy).

    Opening checks the format version, the tokenizer (if given) and every array's index and
    `.bin` size: a truncated copy is refused here, naming the file, not mid-run. The views are
    of memory maps that numpy keeps alive with them: they outlive the dataset object."""

    def __init__(self, prefix: str | os.PathLike, tokenizer: TokenizerFingerprint | None = None):
        self.prefix = str(prefix)
        self.meta = read_meta(prefix)
        if tokenizer is not None:
            check_tokenizer(self.meta, tokenizer, self.prefix)
        self.topk = int(self.meta["topk"])
        self.lengths = _index_lengths(self.prefix, "tokens")  # [n] int32 tokens per trace
        self._starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])  # [n+1]
        self._values = {name: self._open(name) for name in self.meta["arrays"]}

    def _open(self, name: str) -> np.ndarray:
        """The flat values of one array (storage dtype) after checking its index and size."""
        spec, path = ARRAY_SPECS[name], array_path_prefix(self.prefix, name)
        width = self.topk if spec.per_token == "topk" else 1
        lengths, pointers = _index_lengths(self.prefix, name, pointers=True)
        if not np.array_equal(lengths, self.lengths * width):
            raise TraceFormatError(f"{self.prefix}: {name} is not aligned with tokens")
        item_size = np.dtype(spec.storage_dtype).itemsize
        if not np.array_equal(pointers, self._starts[:-1] * width * item_size):
            raise TraceFormatError(f"{path}.idx: traces are not stored one after the other")
        expected, actual = int(self._starts[-1]) * width * item_size, os.path.getsize(path + ".bin")
        if actual != expected:
            message = f"{actual} bytes, its index describes {expected} (a truncated copy?)"
            raise TraceFormatError(f"{path}.bin: {message}")
        if expected == 0:  # an empty file cannot be memory-mapped
            return np.empty(0, spec.storage_dtype)
        return np.memmap(path + ".bin", dtype=spec.storage_dtype, mode="r")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Trace:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.prefix}: trace {index} out of range [0, {len(self)})")
        start, end = int(self._starts[index]), int(self._starts[index + 1])
        arrays = {}
        for name, flat in self._values.items():
            spec = ARRAY_SPECS[name]
            if spec.per_token == "topk":
                values = flat[start * self.topk : end * self.topk].view(spec.dtype)
                arrays[name] = values.reshape(-1, self.topk)  # [T, k]
            else:
                arrays[name] = flat[start:end].view(spec.dtype)  # [T]
        return Trace(**arrays)

    def has(self, name: str) -> bool:
        return name in self._values

    def max_id(self, name: str) -> int:
        """The largest id of an id array (`tokens`, `teacher_topk_ids`): from meta.json's stats,
        else (datasets written before the stat existed) by one pass over the memory map."""
        stat = {"tokens": "max_token_id", "teacher_topk_ids": "max_topk_id"}[name]
        if stat in self.meta["stats"]:
            return int(self.meta["stats"][stat])
        values = self.flat(name)
        return int(values.max()) if values.size else -1

    def flat(self, name: str) -> np.ndarray:
        """All values of one array, traces concatenated in order (a read-only memory map).

        A `.bin` file is exactly that concatenation, so whole-dataset scans need no per-trace
        loop. Top-k arrays come back as [total tokens, k].
        """
        spec = ARRAY_SPECS[name]
        values = self._values[name].view(spec.dtype)
        return values.reshape(-1, self.topk) if spec.per_token == "topk" else values


def _index_lengths(prefix: str, name: str, pointers: bool = False):
    """Sequence lengths (and byte offsets) of one array's index, copied (megatron-core unmaps
    the index with its reader); missing or unreadable files are refused."""
    path = array_path_prefix(prefix, name)
    for suffix in (".idx", ".bin"):
        if not Path(path + suffix).is_file():
            raise TraceFormatError(f"{path}{suffix}: missing (the dataset lists array {name!r})")
    try:
        index = indexed_dataset_module().IndexedDataset(path).index
    except Exception as error:  # numpy / struct errors of a damaged index
        raise TraceFormatError(f"{path}.idx: unreadable index ({error})") from error
    lengths = np.array(index.sequence_lengths)
    return (lengths, np.array(index.sequence_pointers)) if pointers else lengths
