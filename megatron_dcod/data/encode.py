"""Records → traces: tokenization, teacher log-prob alignment, length limits.

Three steps per chunk of records: prepare (parse, render the chat template: cheap, main
process), tokenize (chat.tokenize_rendered: the costly part, in the tokenizer workers), finish
(teacher alignment, validation, length limit: main process). Bad records are returned as values;
the caller decides between failing and skipping. The per-token `source` of a record with
`segments` comes out of the tokenize step (chat.py's source rule).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import resource_tracker
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from megatron_dcod.config import PreprocessConfig, RecordFields
from megatron_dcod.data.chat import ChatTemplateError, ChatTokenizer, Rendered, Tokenized
from megatron_dcod.data.chat import tokenize_rendered
from megatron_dcod.data.engine_align import engine_teacher_arrays
from megatron_dcod.data.engine_records import RECORD_FORMATS, EngineOutputError
from megatron_dcod.data.records import ParsedRecord, RawRecord, RecordError, RecordLocation
from megatron_dcod.data.records import iter_raw_records, parse_record
from megatron_dcod.data.trace_format import Trace, TraceFormatError

RECORDS_PER_CHUNK = 64  # records a worker tokenizes in one batched call
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # bounds memory: the reader never runs far ahead


@dataclass(frozen=True)
class EncodeOptions:
    """How records become traces."""

    fields: RecordFields
    max_seq_length: int | None
    overlong: str  # "truncate" | "drop"
    keep_record_teacher: bool
    """Use the teacher arrays the records carry (False when a teacher model re-scores)."""
    record_format: str = "auto"
    """auto, native, vllm, sglang or openai (PreprocessConfig.record_format)."""

    def __post_init__(self) -> None:
        if self.record_format not in RECORD_FORMATS:
            raise ValueError(
                f"record format must be one of {RECORD_FORMATS}: {self.record_format!r}"
            )


@dataclass
class EncodedRecord:
    """One record's outcome: a trace, or why there is none."""

    location: RecordLocation
    trace: Trace | None
    sidecar: dict[str, Any] | None
    outcome: str  # "kept" | "truncated" | "dropped_overlong" | "dropped_truncated_to_no_target"


@dataclass
class BadRecord:
    """A record that cannot become a trace; `message` names its location and the reason."""

    location: RecordLocation
    message: str
    malformed_json: bool


@dataclass
class PreparedRecord:
    """A parsed record and its rendered conversation, ready for the tokenizer."""

    location: RecordLocation
    record: ParsedRecord
    rendered: Rendered


def prepare_records(
    raw_records: Sequence[RawRecord], chat: ChatTokenizer, options: EncodeOptions
) -> list[PreparedRecord | BadRecord]:
    """Parse and render a chunk of records (the cheap part; the main process does it)."""
    prepared: list[PreparedRecord | BadRecord] = []
    for location, payload in raw_records:
        try:
            record = parse_record(payload, location, options.fields, options.record_format)
            rendered = chat.render_with_spans(record.messages, record.segments)
            prepared.append(PreparedRecord(location, record, rendered))
        except RecordError as error:
            prepared.append(BadRecord(location, str(error), error.malformed_json))
        except ChatTemplateError as error:
            prepared.append(BadRecord(location, f"{location}: {error}", malformed_json=False))
    return prepared


def rendered_of(prepared: Sequence[PreparedRecord | BadRecord]) -> list[Rendered]:
    """What the tokenizer needs from a prepared chunk (see chat.tokenize_rendered)."""
    return [entry.rendered for entry in prepared if isinstance(entry, PreparedRecord)]


def finish_records(
    prepared: Sequence[PreparedRecord | BadRecord],
    tokenized: Sequence[Tokenized],
    chat: ChatTokenizer,
    options: EncodeOptions,
) -> list[EncodedRecord | BadRecord]:
    """Attach teacher arrays, validate and apply the length limit, in input order."""
    tokenized_iter = iter(tokenized)
    return [
        (
            entry
            if isinstance(entry, BadRecord)
            else _to_trace(entry.location, entry.record, next(tokenized_iter), options, chat)
        )
        for entry in prepared
    ]


def encode_records(
    raw_records: Sequence[RawRecord], chat: ChatTokenizer, options: EncodeOptions
) -> list[EncodedRecord | BadRecord]:
    """All three steps in this process: prepare, tokenize, finish."""
    prepared = prepare_records(raw_records, chat, options)
    tokenized = tokenize_rendered(chat.tokenizer.backend_tokenizer, rendered_of(prepared))
    return finish_records(prepared, tokenized, chat, options)


def _to_trace(
    location: RecordLocation,
    record: ParsedRecord,
    tokenized: Tokenized,
    options: EncodeOptions,
    chat: ChatTokenizer,
) -> EncodedRecord | BadRecord:
    tokens, loss_mask, source = tokenized  # source [T] only for records with segments
    try:
        teacher = {}
        if options.keep_record_teacher and record.engine is not None:
            teacher = engine_teacher_arrays(record.engine, tokens, loss_mask, chat.tokenizer)
        trace = Trace(tokens=tokens, loss_mask=loss_mask, source=source, **teacher)
        if not teacher and options.keep_record_teacher and record.teacher_logprobs is not None:
            _attach_teacher(trace, record, chat)
    except (RecordError, TraceFormatError, EngineOutputError) as error:
        return BadRecord(location, f"{location}: {error}", malformed_json=False)
    return _apply_length_limit(location, trace, record.sidecar, options)


def _attach_teacher(trace: Trace, record: ParsedRecord, tokenizer: ChatTokenizer) -> None:
    """Place the teacher's per-response-token arrays at the supervised positions of the trace."""
    supervised = np.flatnonzero(trace.loss_mask)  # [R] positions of the response tokens
    student_ids = trace.tokens[supervised]
    teacher_ids = record.teacher_token_ids
    if len(teacher_ids) != len(student_ids) or not np.array_equal(teacher_ids, student_ids):
        raise TraceFormatError(_token_mismatch_message(student_ids, teacher_ids, tokenizer))
    length = len(trace.tokens)
    trace.teacher_logprobs = np.zeros(length, dtype=np.float32)
    trace.teacher_logprobs[supervised] = record.teacher_logprobs
    if record.teacher_topk_ids is not None:
        k = record.teacher_topk_ids.shape[1]
        trace.teacher_topk_ids = np.zeros((length, k), dtype=np.int32)
        trace.teacher_topk_logprobs = np.zeros((length, k), dtype=np.float16)
        trace.teacher_topk_ids[supervised] = record.teacher_topk_ids
        trace.teacher_topk_logprobs[supervised] = record.teacher_topk_logprobs


def _token_mismatch_message(
    student_ids: np.ndarray, teacher_ids: np.ndarray, tokenizer: ChatTokenizer
) -> str:
    common = min(len(student_ids), len(teacher_ids))
    differs = np.flatnonzero(student_ids[:common] != teacher_ids[:common])
    first = int(differs[0]) if len(differs) else common
    show = tokenizer.tokenizer.convert_ids_to_tokens
    return (
        f"teacher_token_ids do not match the student tokenization of the response "
        f"({len(teacher_ids)} teacher vs {len(student_ids)} student tokens; first difference at "
        f"response token {first}: teacher {show(teacher_ids[first:first + 3].tolist())} vs "
        f"student {show(student_ids[first:first + 3].tolist())}). The teacher must share the "
        "student's tokenizer and cover every supervised token incl. the end-of-turn token, "
        "or re-score with --score-with"
    )


def _apply_length_limit(
    location: RecordLocation, trace: Trace, sidecar: dict | None, options: EncodeOptions
) -> EncodedRecord:
    limit = options.max_seq_length
    if limit is None or len(trace.tokens) <= limit:
        return EncodedRecord(location, trace, sidecar, "kept")
    if options.overlong == "drop":
        return EncodedRecord(location, None, None, "dropped_overlong")
    trace = trace.truncated(limit)
    if not trace.loss_mask.any():
        return EncodedRecord(location, None, None, "dropped_truncated_to_no_target")
    return EncodedRecord(location, trace, sidecar, "truncated")


# ---------------------------------------------------------------------------------------------
# Records → encoded traces, in input order, in the main process or in a pool of workers.

_worker_tokenizer: Any = None  # a tokenizers.Tokenizer: workers never import transformers


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # Ctrl-C reaches the whole process group: the main process alone decides what it means
    # (it cancels the chunks and shuts the pool down); a worker dying of it would break the pool.
    # SIGINT came blocked from _submit, so that the worker could not die of it before this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # one core per worker: N workers, N cores
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _tokenize_in_worker(rendered: list[Rendered]) -> list[Tokenized]:
    return tokenize_rendered(_worker_tokenizer, rendered)


def _submit(pool: ProcessPoolExecutor, rendered: list[Rendered]) -> Future:
    """pool.submit with SIGINT blocked in this thread meanwhile: the executor spawns its workers
    on demand, from submit, and a spawned process inherits the signal mask (a Ctrl-C meanwhile
    is only delayed to the end of the call)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(_tokenize_in_worker, rendered)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def encoded_chunks(
    config: PreprocessConfig, chat: ChatTokenizer, options: EncodeOptions, skip_records: int = 0
) -> Iterator[list[EncodedRecord | BadRecord]]:
    """Chunks of encoded records, in input order. With workers, the main process parses and
    renders the next chunks while the workers tokenize earlier ones.

    With workers the generator holds processes until it is exhausted or closed: close it when
    stopping early rather than leave it to the garbage collector (see tokenizer_pool)."""
    records = chain.from_iterable(iter_raw_records(path, config.split) for path in config.inputs)
    records = islice(records, skip_records, None)  # resuming: those are in finished shards
    chunks = iter(lambda: list(islice(records, RECORDS_PER_CHUNK)), [])
    if config.workers <= 1:
        for chunk in chunks:
            yield encode_records(chunk, chat, options)
        return
    with tokenizer_pool(config.workers, chat) as pool:
        in_flight: deque[tuple[list, Future]] = deque()
        for chunk in chunks:
            prepared = prepare_records(chunk, chat, options)
            in_flight.append((prepared, _submit(pool, rendered_of(prepared))))
            if len(in_flight) >= CHUNKS_IN_FLIGHT_PER_WORKER * config.workers:
                prepared, tokenized = in_flight.popleft()
                yield finish_records(prepared, tokenized.result(), chat, options)
        while in_flight:
            prepared, tokenized = in_flight.popleft()
            yield finish_records(prepared, tokenized.result(), chat, options)


@contextmanager
def tokenizer_pool(workers: int, chat: ChatTokenizer) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` tokenizer processes; no process started for it outlives the block.

    However the block is left (done, bad record, Ctrl-C, generator closed), the workers are
    joined (on an exception the chunks not started yet are cancelled, not tokenized) and the
    resource tracker of the spawn context is stopped if this pool started it."""
    # spawn, not fork: the parent may hold torch / tokenizer thread pools that fork would break;
    # an executor, not a Pool: a worker that dies fails the run instead of hanging it
    tokenizer_json = chat.tokenizer.backend_tokenizer.to_str()
    context = multiprocessing.get_context("spawn")
    tracker_was_running = _resource_tracker_running()
    pool = ProcessPoolExecutor(workers, context, _start_worker, (tokenizer_json,))
    left_early = True
    try:
        yield pool
        left_early = False
    finally:
        pool.shutdown(wait=True, cancel_futures=left_early)
        if not tracker_was_running:  # not reached if a second Ctrl-C cuts the shutdown short
            _stop_resource_tracker()


# The resource tracker is the process that unlinks the named semaphores of a spawn pool if
# their owner dies. Left alone it ends only when every holder of its pipe has exited, i.e.
# after the program: it outlives the program in its process group, holding its stderr. Python
# has no public way to stop it; ResourceTracker._stop (which multiprocessing's own test clean-up
# calls) closes the pipe and waits for the tracker. Safe once the pool is shut down: its
# semaphores are unlinked by then, and the tracker is stopped only if the pool started it, so
# it tracks nothing of anyone else's.


def _resource_tracker_running() -> bool:
    return getattr(resource_tracker._resource_tracker, "_fd", None) is not None


def _stop_resource_tracker() -> None:
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:  # else a Python without it: the tracker ends shortly after the program
        stop()


# ---------------------------------------------------------------------------------------------
# Teacher / reference scoring with HF causal LMs (HF forward passes or offline vLLM).


def load_scorers(config: PreprocessConfig, tokenizer: ChatTokenizer) -> dict[str, Any]:
    """The scorers of the teacher and reference models that are configured, by role."""
    scoring = config.scoring
    models = {"teacher": scoring.teacher_model, "ref": scoring.ref_model}
    models = {role: model_dir for role, model_dir in models.items() if model_dir}
    if scoring.backend not in ("hf", "vllm"):
        raise ValueError(f"scoring backend must be hf or vllm, got {scoring.backend!r}")
    if not models:
        return {}
    common = dict(dtype=scoring.dtype, batch_tokens=scoring.batch_tokens)
    common["min_vocab_size"] = len(tokenizer.tokenizer)
    if scoring.backend == "vllm":
        from megatron_dcod.inference.vllm_scorer import VLLMTraceScorer as Scorer

        common["tensor_parallel_size"] = scoring.tensor_parallel_size
        if len(models) > 1:  # two engines on the same GPUs: vLLM's default 0.9 split in two
            common["gpu_memory_utilization"] = 0.9 / len(models)
    else:
        from megatron_dcod.inference.trace_scorer import CausalLMScorer as Scorer

        common["device"] = scoring.device
    return {
        role: Scorer(model_dir, topk=scoring.topk if role == "teacher" else 0, **common)
        for role, model_dir in models.items()
    }


def scored_chunks(
    chunks: Iterable[list[EncodedRecord | BadRecord]],
    scorers: dict[str, Any],
    config: PreprocessConfig,
) -> Iterator[list[EncodedRecord | BadRecord]]:
    """Attach model log-probs to the traces; scoring pools several chunks to batch by length."""
    if not scorers:
        yield from chunks
        return
    pooled: list[EncodedRecord | BadRecord] = []
    pooled_tokens = 0
    for chunk in chain(chunks, [None]):
        if chunk is not None:
            pooled += chunk
            pooled_tokens += sum(len(e.trace.tokens) for e in chunk if _has_trace(e))
        if chunk is None or pooled_tokens >= 8 * config.scoring.batch_tokens:
            _score(pooled, scorers)
            yield pooled
            pooled, pooled_tokens = [], 0


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
