"""Input records of tools/preprocess_traces.py: reading files and validating one record.

Supported inputs: JSONL (one record a line), JSON (a list of records, or an object holding one
list), Parquet, and HF dataset dirs (`save_to_disk` output, or a dir of data files read with
`datasets.load_dataset`). JSONL lines are handed on as raw bytes so that parsing happens in the
tokenizer workers; every error names the file and line (or record index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_dcod.config import RecordFields
from megatron_dcod.data.engine_openai import read_openai
from megatron_dcod.data.engine_records import ENGINE_KEYS, RECORD_FORMATS, EngineLogprobs
from megatron_dcod.data.engine_records import EngineOutputError, detect_format, read_sglang
from megatron_dcod.data.engine_records import read_vllm
from megatron_dcod.data.sources import SOURCE_CODES, SUPERVISED_SOURCES

import orjson


@dataclass(frozen=True)
class RecordLocation:
    """Where a record came from, for error messages."""

    file: str
    index: int
    """0-based record index within the file."""
    line: int | None = None
    """1-based line number (JSONL only)."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else f"{self.file} record {self.index}"


class RecordError(ValueError):
    """A record that cannot become a trace; the message names its location."""

    def __init__(self, location: RecordLocation, message: str, malformed_json: bool = False):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.malformed_json = malformed_json


RawRecord = tuple[RecordLocation, Any]  # payload: bytes (a JSONL line) or an already-parsed dict


def iter_raw_records(path: str, split: str = "train") -> Iterator[RawRecord]:
    """Yield (location, payload) for every record of one input, in file order."""
    source = Path(path)
    if source.is_dir():
        yield from _iter_hf_dataset_dir(source, split)
    elif not source.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    elif source.suffix == ".jsonl":
        with open(source, "rb") as lines:
            index = 0
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield RecordLocation(path, index, line_number), line
                    index += 1
    elif source.suffix == ".json":
        yield from _iter_json_file(source)
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(source).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield RecordLocation(path, index), row
                index += 1
    else:
        raise ValueError(f"input {path}: unsupported extension (.jsonl, .json, .parquet or a dir)")


def _iter_json_file(source: Path) -> Iterator[RawRecord]:
    try:
        document = json.loads(source.read_bytes())
    except json.JSONDecodeError as error:
        raise RecordError(
            RecordLocation(str(source), 0, error.lineno), f"malformed JSON: {error.msg}", True
        ) from error
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise ValueError(f"{source}: expected a list of records or an object holding one")
        document = lists[0]
    if not isinstance(document, list):
        raise ValueError(f"{source}: expected a list of records")
    for index, record in enumerate(document):
        yield RecordLocation(str(source), index), record


def _iter_hf_dataset_dir(source: Path, split: str) -> Iterator[RawRecord]:
    import datasets

    if (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(str(source), split=split)
    for index, row in enumerate(loaded):
        yield RecordLocation(str(source), index), row


@dataclass
class ParsedRecord:
    """A validated record: the conversation and what the teacher said about its response."""

    messages: list[dict[str, str]]
    teacher_logprobs: np.ndarray | None = None  # [R] float32, R = supervised tokens
    teacher_token_ids: np.ndarray | None = None  # [R] int64
    teacher_topk_ids: np.ndarray | None = None  # [R, k] int32
    teacher_topk_logprobs: np.ndarray | None = None  # [R, k] float32
    sidecar: dict[str, Any] | None = None  # free metadata (answer, ids, ...)
    segments: list[tuple[int, str]] | None = None
    """(source code, text) of the pieces of the response, in order (None: no `segments`)."""
    engine: EngineLogprobs | None = None
    """An inference engine's output for the whole rendered sequence (engine-format records,
    data/engine_records.py), in place of the native teacher arrays."""


def parse_record(
    payload: Any, location: RecordLocation, fields: RecordFields, record_format: str = "auto"
) -> ParsedRecord:
    """Turn a raw payload into a ParsedRecord, or raise RecordError saying what is wrong.
    `record_format`: auto (native teacher fields, else the engine format detected), native,
    vllm, sglang or openai (data/engine_records.py)."""
    if isinstance(payload, (bytes, str)):
        payload = loads_record(payload, location)
    if not isinstance(payload, dict):
        raise RecordError(location, f"a record must be a JSON object, got {type(payload).__name__}")
    record = dict(payload)
    messages = _messages_of(record, location, fields)
    engine_format = _engine_format(record, location, fields, record_format)
    teacher = _teacher_arrays(record, location, fields) if engine_format is None else {}
    engine = None if engine_format is None else _engine_output(record, location, engine_format)
    segments = _segments_of(record, location, fields.segments, messages)
    consumed = {fields.messages, fields.prompt, fields.response, fields.system, fields.segments}
    consumed |= {fields.teacher_logprobs, fields.teacher_token_ids, fields.teacher_topk}
    consumed |= set(ENGINE_KEYS.get(engine_format, ()))
    sidecar = {key: value for key, value in record.items() if key not in consumed}
    return ParsedRecord(messages, sidecar=sidecar, segments=segments, engine=engine, **teacher)


def _engine_format(
    record: dict, location: RecordLocation, fields: RecordFields, record_format: str
) -> str | None:
    """The engine format to read (None: native teacher fields, or none at all). In auto mode
    native teacher fields win, so records of the native format read as they always did."""
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record format must be one of {RECORD_FORMATS}, got {record_format!r}")
    if record_format == "native":
        return None
    native = [
        name
        for name in (fields.teacher_logprobs, fields.teacher_token_ids, fields.teacher_topk)
        if record.get(name) is not None
    ]
    if record_format == "auto":
        return None if native else detect_format(record)
    if native:
        raise RecordError(
            location,
            f"--record-format {record_format}, but the record carries the native teacher "
            f"field(s) {native}: use --record-format native, or drop them",
        )
    return record_format


def _engine_output(record: dict, location: RecordLocation, engine_format: str) -> EngineLogprobs:
    try:
        readers = {"vllm": read_vllm, "sglang": read_sglang, "openai": read_openai}
        return readers[engine_format](record)
    except EngineOutputError as error:
        detected = detect_format(record)
        looks = f" (the record looks like {detected} output)" if detected else ""
        looks = "" if detected == engine_format else looks
        raise RecordError(location, f"{engine_format} output: {error}{looks}") from None


def loads_record(line: bytes | str, location: RecordLocation) -> Any:
    """One JSON record; RecordError naming its location when malformed. orjson (fast), falling back to json, which also reads NaN / Infinity (then rejected by
    the log-prob checks with a precise message rather than as malformed JSON)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            return json.loads(line)
        except ValueError as error:
            raise RecordError(location, f"malformed JSON: {error}", malformed_json=True) from error


def _messages_of(record: dict, location: RecordLocation, fields: RecordFields) -> list[dict]:
    if record.get(fields.messages) is not None:
        messages = record[fields.messages]
        if not isinstance(messages, list) or not messages:
            raise RecordError(location, f"field '{fields.messages}' must be a non-empty list")
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
                raise RecordError(location, f"message {turn} needs 'role' and 'content'")
            if not isinstance(message["content"], str) or not message["content"].strip():
                role = message["role"]
                raise RecordError(location, f"message {turn} ({role}) needs non-empty text")
        if not any(message["role"] == "assistant" for message in messages):
            raise RecordError(location, "no assistant message: nothing to supervise")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for name in (fields.prompt, fields.response):
        value = record.get(name)
        if value is None:
            raise RecordError(
                location, f"missing field '{name}' (and no '{fields.messages}' field)"
            )
        if not isinstance(value, str) or not value.strip():
            raise RecordError(location, f"field '{name}' is empty")
    messages = [
        {"role": "user", "content": record[fields.prompt]},
        {"role": "assistant", "content": record[fields.response]},
    ]
    if record.get(fields.system):
        messages.insert(0, {"role": "system", "content": record[fields.system]})
    return messages


def _segments_of(
    record: dict, location: RecordLocation, name: str, messages: list[dict]
) -> list[tuple[int, str]] | None:
    """The validated `segments` field: known sources, string texts that concatenate exactly to
    the content of the conversation's only assistant turn."""
    segments = record.get(name)
    if segments is None:
        return None
    if not isinstance(segments, list) or not segments:
        raise RecordError(location, f"field '{name}' must be a non-empty list of {{source, text}}")
    parsed = []
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
            raise RecordError(location, f"'{name}'[{index}] must be an object with a string 'text'")
        if segment.get("source") not in SUPERVISED_SOURCES:
            raise RecordError(
                location,
                f"'{name}'[{index}] has source {segment.get('source')!r}: must be one of "
                f"{', '.join(SUPERVISED_SOURCES)}",
            )
        parsed.append((SOURCE_CODES[segment["source"]], segment["text"]))
    responses = [message["content"] for message in messages if message["role"] == "assistant"]
    if len(responses) > 1:
        raise RecordError(
            location, f"'{name}' describe one response, but the record has {len(responses)} "
            "assistant turns",
        )  # fmt: skip
    joined, response = "".join(text for _, text in parsed), responses[0]
    if joined != response:
        differs = next(
            (i for i, (a, b) in enumerate(zip(joined, response)) if a != b),
            min(len(joined), len(response)),
        )
        raise RecordError(
            location,
            f"the texts of '{name}' do not concatenate to the response ({len(joined)} vs "
            f"{len(response)} characters; from character {differs}: "
            f"{joined[differs:differs + 20]!r} vs {response[differs:differs + 20]!r})",
        )
    return parsed


def _teacher_arrays(record: dict, location: RecordLocation, fields: RecordFields) -> dict:
    logprobs = record.get(fields.teacher_logprobs)
    token_ids = record.get(fields.teacher_token_ids)
    topk = record.get(fields.teacher_topk)
    if logprobs is None and topk is None:
        return {}
    if logprobs is None or token_ids is None:
        raise RecordError(
            location,
            f"'{fields.teacher_logprobs}' and '{fields.teacher_token_ids}' must come together "
            "(the ids verify that the log-probs belong to the student's tokens)",
        )
    try:
        logprobs = np.asarray(logprobs, dtype=np.float64)
        token_ids = np.asarray(token_ids, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise RecordError(location, f"teacher log-probs / ids are not numbers: {error}") from error
    if logprobs.ndim != 1 or logprobs.shape != token_ids.shape:
        raise RecordError(
            location,
            f"{len(logprobs)} teacher log-probs for {len(token_ids)} teacher token ids",
        )
    _check_logprob_values(logprobs, location, fields.teacher_logprobs)
    arrays = {"teacher_logprobs": logprobs.astype(np.float32), "teacher_token_ids": token_ids}
    if topk is not None:
        arrays.update(_topk_arrays(topk, len(token_ids), location, fields.teacher_topk))
    return arrays


def _check_logprob_values(logprobs: np.ndarray, location: RecordLocation, name: str) -> None:
    bad = ~np.isfinite(logprobs) | (logprobs > 0)
    if bad.any():
        position = int(np.argmax(bad))
        raise RecordError(
            location,
            f"'{name}'[{position}] = {logprobs.flat[position]}: log-probs must be finite and <= 0",
        )


def _topk_arrays(topk: Any, length: int, location: RecordLocation, name: str) -> dict:
    if not isinstance(topk, list) or len(topk) != length:
        raise RecordError(location, f"'{name}' must list the top-k of each of the {length} tokens")
    k = len(topk[0]) if topk and isinstance(topk[0], list) else 0
    try:
        ids = [[entry["id"] for entry in position] for position in topk]
        logprobs = [[entry["logprob"] for entry in position] for position in topk]
        if k == 0 or any(len(position) != k for position in ids):
            raise ValueError(f"every position needs the same number (>= 1) of entries, k={k}")
        ids = np.asarray(ids, dtype=np.int32)  # [R, k]
        logprobs = np.asarray(logprobs, dtype=np.float64)  # [R, k]
    except (TypeError, KeyError, ValueError) as error:
        raise RecordError(location, f"'{name}' is not [[{{id, logprob}}, ...], ...]: {error}")
    _check_logprob_values(logprobs, location, name)
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs.astype(np.float32)}
