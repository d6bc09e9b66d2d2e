"""tools/preprocess_traces.py: teacher-trace records in, one trace dataset out.

    read, parse, render (main) ─► tokenize (N workers) ─► align, check (main)
        ─► [score with HF models] ─► shard datasets ─► merged dataset, renamed into place

Resumable: records are written in shards of `shard_records` into a hidden work dir beside the
prefix; an interrupted run, rerun with the same command, skips the records of finished shards.
Bad input (deterministic) removes the work dir; nothing is ever left at the prefix itself.
Rerunning a finished build is a no-op; another build at the prefix needs --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import asdict, replace
from functools import reduce
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

import megatron_dcod
from megatron_dcod.config import PreprocessConfig
from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.data.encode import (
    BadRecord,
    EncodedRecord,
    EncodeOptions,
    encoded_chunks,
    load_scorers,
    scored_chunks,
)
from megatron_dcod.data.trace_format import (
    FORMAT_VERSION,
    TraceDatasetWriter,
    TraceFormatError,
    meta_path,
    read_meta,
)

logger = logging.getLogger(__name__)

MAX_BAD_RECORDS_LOGGED = 10
INPUT_ERRORS = (ValueError, FileNotFoundError)  # bad input: rerunning cannot help
LATER_SETTINGS = (
    ("record_format", "auto"),
    ("scoring.backend", "hf"),
    ("scoring.tensor_parallel_size", 1),
)
"""Settings added after the first datasets were built, with their defaults: left out of the
build key at those defaults, so that rerunning an older dataset's command stays a no-op."""


def preprocess_traces(config: PreprocessConfig, command: str = "") -> dict[str, Any]:
    """Build (or resume building) the dataset described by `config`; return its meta.json."""
    chat = ChatTokenizer(config.tokenizer)
    inputs = [_describe_input(path) for path in config.inputs]
    build_key = _build_key(config, inputs, chat)
    if meta_path(config.output_prefix).exists() and not config.overwrite:
        existing = read_meta(config.output_prefix)
        if existing.get("build_key") == build_key:
            logger.info("%s is up to date; nothing to do", config.output_prefix)
            return existing
        raise FileExistsError(
            f"{config.output_prefix}: a dataset built from other inputs or arguments exists; "
            "pass --overwrite to replace it"
        )
    work = _WorkDir(config.output_prefix, build_key)
    meta = {
        "tokenizer": asdict(chat.fingerprint),
        "teacher_logprobs_from": "model" if config.scoring.teacher_model else "records",
        "inputs": inputs,
        "command": command,
        "config": asdict(config),
        "build_key": build_key,
    }
    try:
        _write_shards(config, chat, work)
        final_meta = _merge_shards(config, work, meta)
    except INPUT_ERRORS:
        work.remove()
        raise
    except BaseException:
        logger.warning("interrupted: rerun the same command to resume from %s", work.path)
        raise
    work.remove()
    logger.info("wrote %s: %s", config.output_prefix, final_meta["counts"])
    return final_meta


class _WorkDir:
    """The hidden dir of one build: finished shard datasets and progress.json."""

    def __init__(self, output_prefix: str, build_key: str):
        prefix = Path(output_prefix)
        self.path = prefix.parent / f".{prefix.name}.build-{build_key[:16]}"
        for stale in prefix.parent.glob(f".{prefix.name}.build-*"):
            if stale != self.path:  # another build's shards can never be resumed by this one
                shutil.rmtree(stale, ignore_errors=True)
        for leftover in prefix.parent.glob(f".{prefix.name}.partial-*"):
            leftover.unlink()  # temporary files of a writer killed before it could clean up
        self.path.mkdir(parents=True, exist_ok=True)
        progress_file = self.path / "progress.json"
        self.progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
        self.progress.setdefault("shards", [])

    def shard_prefix(self, index: int) -> Path:
        return self.path / f"shard-{index:06d}"

    def records_done(self) -> int:
        return sum(shard["records"] for shard in self.progress["shards"])

    def save(self) -> None:
        temp = self.path / "progress.json.tmp"
        temp.write_text(json.dumps(self.progress, indent=1))
        temp.replace(self.path / "progress.json")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_shards(config: PreprocessConfig, chat: ChatTokenizer, work: _WorkDir) -> None:
    options = EncodeOptions(
        fields=config.fields,
        max_seq_length=config.max_seq_length,
        overlong=config.overlong,
        keep_record_teacher=config.scoring.teacher_model is None,
        record_format=config.record_format,
    )
    done = work.records_done()
    if done:
        logger.info("resuming after %d records (%d shards)", done, len(work.progress["shards"]))
    scorers = load_scorers(config, chat)
    encoded = encoded_chunks(config, chat, options, done)
    records = chain.from_iterable(scored_chunks(encoded, scorers, config))
    # the bar counts tokens written (its rate is tokens/s); records read go in the postfix
    progress = tqdm(desc="preprocess", unit="tok", unit_scale=True, mininterval=1.0)
    # closed on the way out, not whenever it is garbage collected: its workers end with it
    with closing(encoded), progress:
        while True:
            index = len(work.progress["shards"])
            shard_records = islice(records, config.shard_records)
            shard = _write_shard(shard_records, work.shard_prefix(index), config, work, progress)
            if shard["records"] == 0:
                return
            work.progress["shards"].append(shard)
            work.save()


def _write_shard(
    records: Iterator[EncodedRecord | BadRecord],
    prefix: Path,
    config: PreprocessConfig,
    work: _WorkDir,
    progress: tqdm,
) -> dict[str, Any]:
    """Write one shard dataset; return what progress.json records of it."""
    done_before = work.records_done()
    outcomes: Counter = Counter()
    writer: TraceDatasetWriter | None = None
    with ExitStack() as cleanup:  # an exception deletes the shard's temporary files
        for encoded in records:
            outcomes["read"] += 1
            progress.set_postfix(records=done_before + outcomes["read"], refresh=False)
            if isinstance(encoded, BadRecord):
                _handle_bad_record(encoded, config.skip_bad, outcomes)
                continue
            outcomes[encoded.outcome] += 1
            if encoded.trace is None:
                continue
            if writer is None:
                arrays = work.progress.setdefault("arrays", encoded.trace.present_arrays())
                topk = work.progress.setdefault("topk", _topk_of(encoded.trace))
                writer = cleanup.enter_context(TraceDatasetWriter(prefix, arrays, topk))
            if _add_to_writer(writer, encoded, config, outcomes):
                progress.update(len(encoded.trace.tokens))
        if writer is not None:
            writer.commit({})
    read = outcomes.pop("read", 0)
    return {"prefix": prefix.name if writer else None, "records": read, "outcomes": outcomes}


def _merge_shards(config: PreprocessConfig, work: _WorkDir, meta: dict) -> dict[str, Any]:
    shards = work.progress["shards"]
    outcomes = sum((Counter(shard["outcomes"]) for shard in shards), Counter())
    meta["records"] = {"read": work.records_done(), **dict(sorted(outcomes.items()))}
    if "arrays" not in work.progress:
        raise ValueError(f"no trace to write: {meta['records']}")
    arrays, topk = work.progress["arrays"], work.progress["topk"]
    with TraceDatasetWriter(config.output_prefix, arrays, topk) as writer:
        for shard in shards:
            if shard["prefix"]:
                writer.add_dataset(work.path / shard["prefix"])
        return writer.commit(meta)


def _handle_bad_record(bad: BadRecord, skip_bad: bool, outcomes: Counter) -> None:
    if not skip_bad:
        raise ValueError(bad.message)
    kind = "skipped_malformed_json" if bad.malformed_json else "skipped_invalid"
    outcomes[kind] += 1
    if outcomes["skipped_malformed_json"] + outcomes["skipped_invalid"] <= MAX_BAD_RECORDS_LOGGED:
        logger.warning("skipping %s", bad.message)


def _add_to_writer(
    writer: TraceDatasetWriter, encoded: EncodedRecord, config: PreprocessConfig, outcomes: Counter
) -> bool:
    """Write one trace; False if the writer refused it and --skip-bad skipped it."""
    location = encoded.location
    sidecar = {"input": location.file, "record": location.index, **(encoded.sidecar or {})}
    try:
        if ("source" in writer.arrays) != (encoded.trace.source is not None):
            has = "has" if encoded.trace.source is not None else "has no"
            raise TraceFormatError(
                f"{has} '{config.fields.segments}' field, unlike the records before it: "
                "the records of a dataset carry segments all or none"
            )
        writer.add(encoded.trace, sidecar)
    except TraceFormatError as error:  # e.g. a record without teacher arrays among ones with
        bad = BadRecord(location, f"{location}: {error}", False)
        _handle_bad_record(bad, config.skip_bad, outcomes)
        outcomes[encoded.outcome] -= 1
        return False
    return True


def _topk_of(trace: Any) -> int:
    return 0 if trace.teacher_topk_ids is None else int(trace.teacher_topk_ids.shape[1])


# ---------------------------------------------------------------------------------------------
# What the dataset is built from: the key that makes a rerun a no-op.


def _describe_input(path: str) -> dict[str, Any]:
    """Path, size and sha256 of an input file (or of every file of a dataset dir)."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(source) if source.is_dir() else "").encode())
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return {
        "path": path,
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": digest.hexdigest(),
    }


def describe_model_dir(model_dir: str | None) -> list | None:
    """Names, sizes and modification times of a model dir's files (weights are not hashed)."""
    if model_dir is None:
        return None
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    return [(str(f.relative_to(model_dir)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _build_key(config: PreprocessConfig, inputs: list[dict], tokenizer: ChatTokenizer) -> str:
    """Hash of everything the dataset's contents depend on (not of workers or --overwrite).

    Shard size is included: a resumed build must cut the records where the first run did."""
    settings = asdict(replace(config, workers=1, overwrite=False))
    for name, default in LATER_SETTINGS:  # at their default: hashed as before they existed
        *parents, leaf = name.split(".")
        owner = reduce(dict.__getitem__, parents, settings)
        if owner[leaf] == default:
            del owner[leaf]
    described = {
        "format_version": FORMAT_VERSION,
        "code_version": megatron_dcod.__version__,
        "config": settings,
        "inputs": [entry["sha256"] for entry in inputs],
        "tokenizer": asdict(tokenizer.fingerprint),
        "teacher_model": describe_model_dir(config.scoring.teacher_model),
        "ref_model": describe_model_dir(config.scoring.ref_model),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
