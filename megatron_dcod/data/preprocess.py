"""tools/preprocess_traces.py: teacher-trace records in, one trace dataset (DESIGN.md §4) out.

    read records (main process) ─► parse + chat template + tokenize + align (N workers, in order)
        ─► [score with HF models, batched] ─► TraceDatasetWriter (temporary names, renamed at end)

Rerunning with the same inputs, tokenizer and arguments finds the finished dataset and does
nothing; anything else at the prefix is only replaced with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from megatron_dcod.config import PreprocessConfig
import numpy as np

from megatron_dcod.data.chat import ChatTokenizer, Rendered, tokenize_rendered
from megatron_dcod.data.encode import (
    BadRecord,
    EncodedRecord,
    EncodeOptions,
    encode_records,
    finish_records,
    prepare_records,
    rendered_of,
)
from megatron_dcod.data.records import RawRecord, iter_raw_records
from megatron_dcod.data.trace_format import (
    FORMAT_VERSION,
    TraceDatasetWriter,
    TraceFormatError,
    meta_path,
    preload_indexed_dataset,
    read_meta,
)

logger = logging.getLogger(__name__)

RECORDS_PER_CHUNK = 64  # records a worker tokenizes in one batched call
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # bounds memory: the reader never runs far ahead
MAX_BAD_RECORDS_LOGGED = 10


def preprocess_traces(config: PreprocessConfig, command: str = "") -> dict[str, Any]:
    """Build the dataset described by `config`; return its meta.json contents."""
    tokenizer = ChatTokenizer(config.tokenizer)
    inputs = [_describe_input(path) for path in config.inputs]
    build_key = _build_key(config, inputs, tokenizer)
    if meta_path(config.output_prefix).exists() and not config.overwrite:
        existing = read_meta(config.output_prefix)
        if existing.get("build_key") == build_key:
            logger.info("%s is up to date; nothing to do", config.output_prefix)
            return existing
        raise FileExistsError(
            f"{config.output_prefix}: a dataset built from other inputs or arguments exists; "
            "pass --overwrite to replace it"
        )
    # the writer needs megatron-core only at the first trace: import it while workers start
    threading.Thread(target=preload_indexed_dataset, daemon=True).start()
    scorers = _load_scorers(config, tokenizer)
    options = EncodeOptions(
        fields=config.fields,
        max_seq_length=config.max_seq_length,
        overlong=config.overlong,
        keep_record_teacher=config.scoring.teacher_model is None,
    )
    meta = {
        "tokenizer": asdict(tokenizer.fingerprint),
        "teacher_logprobs_from": "model" if scorers.get("teacher") else "records",
        "inputs": inputs,
        "command": command,
        "config": asdict(config),
        "build_key": build_key,
    }
    return _write_dataset(config, tokenizer, options, scorers, meta)


def _write_dataset(
    config: PreprocessConfig,
    tokenizer: ChatTokenizer,
    options: EncodeOptions,
    scorers: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    outcomes: Counter = Counter()
    started, tokens_done = time.perf_counter(), 0
    with ExitStack() as cleanup:  # an exception leaves nothing behind at the prefix
        progress = cleanup.enter_context(tqdm(desc="preprocess", unit=" rec", mininterval=1.0))
        writer: TraceDatasetWriter | None = None
        for batch in _scored_batches(_encoded(config, tokenizer, options), scorers, config):
            for encoded in batch:
                outcomes["read"] += 1
                if isinstance(encoded, BadRecord):
                    _handle_bad_record(encoded, config.skip_bad, outcomes)
                    continue
                outcomes[encoded.outcome] += 1
                if encoded.trace is None:
                    continue
                if writer is None:
                    arrays, topk = encoded.trace.present_arrays(), _topk_of(encoded.trace)
                    writer = cleanup.enter_context(
                        TraceDatasetWriter(config.output_prefix, arrays, topk)
                    )
                _add_to_writer(writer, encoded, config.skip_bad, outcomes)
                tokens_done += len(encoded.trace.tokens)
            progress.update(len(batch))
            elapsed = time.perf_counter() - started
            progress.set_postfix(tokens_per_s=f"{tokens_done / elapsed:.3g}", refresh=False)
        if writer is None:
            raise ValueError(f"no trace to write: {dict(outcomes)}")
        meta["records"] = {"read": outcomes.pop("read"), **dict(sorted(outcomes.items()))}
        final_meta = writer.commit(meta)
    logger.info("wrote %s: %s", config.output_prefix, final_meta["counts"])
    return final_meta


def _handle_bad_record(bad: BadRecord, skip_bad: bool, outcomes: Counter) -> None:
    if not skip_bad:
        raise ValueError(bad.message)
    kind = "skipped_malformed_json" if bad.malformed_json else "skipped_invalid"
    outcomes[kind] += 1
    if outcomes["skipped_malformed_json"] + outcomes["skipped_invalid"] <= MAX_BAD_RECORDS_LOGGED:
        logger.warning("skipping %s", bad.message)


def _add_to_writer(
    writer: TraceDatasetWriter, encoded: EncodedRecord, skip_bad: bool, outcomes: Counter
) -> None:
    location = encoded.location
    sidecar = {"input": location.file, "record": location.index, **(encoded.sidecar or {})}
    try:
        writer.add(encoded.trace, sidecar)
    except TraceFormatError as error:  # e.g. a record without teacher arrays among ones with
        _handle_bad_record(BadRecord(location, f"{location}: {error}", False), skip_bad, outcomes)
        outcomes[encoded.outcome] -= 1


def _topk_of(trace: Any) -> int:
    return 0 if trace.teacher_topk_ids is None else int(trace.teacher_topk_ids.shape[1])


# ---------------------------------------------------------------------------------------------
# Records → encoded traces, in input order, in the main process or in a pool of workers.

_worker_tokenizer: Any = None  # a tokenizers.Tokenizer: workers never import transformers


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # one core per worker: N workers, N cores
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _tokenize_in_worker(rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
    return tokenize_rendered(_worker_tokenizer, rendered)


def _encoded(
    config: PreprocessConfig, chat: ChatTokenizer, options: EncodeOptions
) -> Iterator[list[EncodedRecord | BadRecord]]:
    """Chunks of encoded records, in input order. With workers, the main process parses and
    renders the next chunks while the workers tokenize earlier ones."""
    records = chain.from_iterable(iter_raw_records(path, config.split) for path in config.inputs)
    chunks = iter(lambda: list(islice(records, RECORDS_PER_CHUNK)), [])
    if config.workers <= 1:
        for chunk in chunks:
            yield encode_records(chunk, chat, options)
        return
    # spawn, not fork: the parent may hold torch / tokenizer thread pools that fork would break;
    # an executor, not a Pool: a worker that dies fails the run instead of hanging it
    tokenizer_json = chat.tokenizer.backend_tokenizer.to_str()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, context, _start_worker, (tokenizer_json,)) as pool:
        in_flight: deque[tuple[list, Future]] = deque()
        for chunk in chunks:
            prepared = prepare_records(chunk, chat, options)
            in_flight.append((prepared, pool.submit(_tokenize_in_worker, rendered_of(prepared))))
            if len(in_flight) >= CHUNKS_IN_FLIGHT_PER_WORKER * config.workers:
                prepared, tokenized = in_flight.popleft()
                yield finish_records(prepared, tokenized.result(), chat, options)
        while in_flight:
            prepared, tokenized = in_flight.popleft()
            yield finish_records(prepared, tokenized.result(), chat, options)


# ---------------------------------------------------------------------------------------------
# Teacher / reference scoring with HF causal LMs.


def _load_scorers(config: PreprocessConfig, tokenizer: ChatTokenizer) -> dict[str, Any]:
    scoring = config.scoring
    models = {"teacher": scoring.teacher_model, "ref": scoring.ref_model}
    if not any(models.values()):
        return {}
    from megatron_dcod.scoring.hf_scorer import CausalLMScorer

    return {
        role: CausalLMScorer(
            model_dir,
            device=scoring.device,
            dtype=scoring.dtype,
            batch_tokens=scoring.batch_tokens,
            topk=scoring.topk if role == "teacher" else 0,
            min_vocab_size=len(tokenizer.tokenizer),
        )
        for role, model_dir in models.items()
        if model_dir
    }


def _scored_batches(
    chunks: Iterable[list[EncodedRecord | BadRecord]],
    scorers: dict[str, Any],
    config: PreprocessConfig,
) -> Iterator[list[EncodedRecord | BadRecord]]:
    """Attach model log-probs to the traces; scoring pools several chunks to batch by length."""
    if not scorers:
        yield from chunks
        return
    pooled: list[EncodedRecord | BadRecord] = []
    for chunk in chain(chunks, [None]):
        if chunk is not None:
            pooled += chunk
        pooled_tokens = sum(len(e.trace.tokens) for e in pooled if _has_trace(e))
        if chunk is None or pooled_tokens >= 8 * config.scoring.batch_tokens:
            _score(pooled, scorers)
            yield pooled
            pooled = []


def _has_trace(encoded: EncodedRecord | BadRecord) -> bool:
    return isinstance(encoded, EncodedRecord) and encoded.trace is not None


def _score(pooled: list[EncodedRecord | BadRecord], scorers: dict[str, Any]) -> None:
    traces = [encoded.trace for encoded in pooled if _has_trace(encoded)]
    inputs = [(trace.tokens, trace.loss_mask) for trace in traces]
    if "teacher" in scorers:
        for trace, scored in zip(traces, scorers["teacher"].score(inputs)):
            trace.teacher_logprobs = scored.logprobs
            trace.teacher_topk_ids = scored.topk_ids
            trace.teacher_topk_logprobs = scored.topk_logprobs
    if "ref" in scorers:
        for trace, scored in zip(traces, scorers["ref"].score(inputs)):
            trace.ref_logprobs = scored.logprobs


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


def _describe_model_dir(model_dir: str | None) -> list | None:
    """Names, sizes and modification times of a model dir's files (weights are not hashed)."""
    if model_dir is None:
        return None
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    return [(str(f.relative_to(model_dir)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _build_key(config: PreprocessConfig, inputs: list[dict], tokenizer: ChatTokenizer) -> str:
    """Hash of everything the dataset's contents depend on (not of workers or --overwrite)."""
    relevant = replace(config, workers=1, overwrite=False)
    described = {
        "format_version": FORMAT_VERSION,
        "config": asdict(relevant),
        "inputs": [entry["sha256"] for entry in inputs],
        "tokenizer": asdict(tokenizer.fingerprint),
        "teacher_model": _describe_model_dir(config.scoring.teacher_model),
        "ref_model": _describe_model_dir(config.scoring.ref_model),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
