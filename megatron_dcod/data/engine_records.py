"""Inference-engine outputs as input records: vLLM, SGLang and OpenAI-compatible responses.

Such a record carries the conversation (tokenized with the student tokenizer like any record)
plus the engine's output for the whole chat-template-rendered sequence, sent to the engine as the
prompt and scored with prompt log-probs. Each format is read into one normalized structure,
EngineLogprobs: vLLM and SGLang here, OpenAI-compatible completions in data/engine_openai.py;
data/engine_align.py then checks it against the student's tokenization and places it at the
supervised positions. Element i of an engine's prompt log-probs is log p(token_i | tokens_<i):
the dataset's alignment rule, no shift needed.

docs/data_format.md, "Inference-engine outputs", describes the fields of each format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ENGINE_FORMATS = ("vllm", "sglang", "openai")
RECORD_FORMATS = ("auto", "native", *ENGINE_FORMATS)
ENGINE_KEYS = {
    "vllm": ("prompt_logprobs", "prompt_token_ids", "outputs", "choices"),
    "sglang": ("meta_info", "input_ids", "output_ids", "logprob_start_len"),
    "openai": ("choices",),
}
"""Record fields an engine format consumes (not copied to the sidecar)."""

Entry = tuple[int, float, float]  # (token id, log-prob, rank; inf when the rank is unknown)


class EngineOutputError(ValueError):
    """An engine output that is malformed or does not fit the student's tokens; the message
    names the field or position but not the record (the caller adds that)."""


@dataclass
class EngineLogprobs:
    """What an engine said about a scored sequence, whatever its format."""

    format: str
    """vllm, sglang or openai."""
    logprobs: np.ndarray  # [N] float64, log p(token_i | tokens_<i); NaN where the engine gives null
    token_ids: np.ndarray | None  # [N] int64 (None: only token strings, see token_texts)
    token_texts: list[str] | None = None
    """The engine's string of each token (openai records without `token_id:` strings): checked
    against the student tokens decoded one by one."""
    topk_ids: np.ndarray | None = None  # [N, k] int32, 0 on null rows; None: no top-k
    topk_logprobs: np.ndarray | None = None  # [N, k] float64, NaN on null rows, descending
    start: int = 0
    """Position in the sequence of element 0 (SGLang's logprob_start_len without `input_ids`)."""
    extra_tail: int = 0
    """Trailing engine tokens past the sequence that may be dropped: 1 for an openai echo without
    `usage` (the generated token of max_tokens=1)."""


def detect_format(record: Mapping) -> str | None:
    """The engine format whose fields `record` carries (None: none of them)."""
    choice = first_choice(record)
    if record.get("prompt_logprobs") is not None or choice.get("prompt_logprobs") is not None:
        return "vllm"
    meta = record.get("meta_info")
    if isinstance(meta, Mapping) and meta.get("input_token_logprobs") is not None:
        return "sglang"
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, Mapping) and logprobs.get("tokens") is not None:
        return "openai"
    return None


def first_choice(record: Mapping) -> Mapping:
    """choices[0] of a server response ({} when there is none)."""
    choices = record.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return first if isinstance(first, Mapping) else {}


def only_choice(record: Mapping) -> Mapping:
    """choices[0], refusing a response with several (a record scores one sequence)."""
    choices = record.get("choices")
    if isinstance(choices, list) and len(choices) > 1:
        raise EngineOutputError(
            f"{len(choices)} choices: a record is the response to one prompt (n=1)"
        )
    return first_choice(record)


# ---------------------------------------------------------------------------------------------
# vLLM: RequestOutput.prompt_logprobs (offline, or JSON dumps), server choices[0].prompt_logprobs


def read_vllm(record: Mapping) -> EngineLogprobs:
    """Top-level `prompt_token_ids` + `prompt_logprobs` (a dumped RequestOutput), or a server
    response with `choices[0].prompt_logprobs` (ids at the top level or in choices[0])."""
    choice = only_choice(record)
    source = record if record.get("prompt_logprobs") is not None else choice
    if source.get("prompt_logprobs") is None:
        raise EngineOutputError("no 'prompt_logprobs' (top level, or in choices[0])")
    ids = record.get("prompt_token_ids")
    ids = choice.get("prompt_token_ids") if ids is None else ids
    if ids is None:
        raise EngineOutputError(
            "no 'prompt_token_ids' (top level, or in choices[0]; the vLLM server returns them "
            'with "return_token_ids": true)'
        )
    token_ids = int_array(ids, "prompt_token_ids")
    logprobs, topk_ids, topk_logprobs = vllm_prompt_logprobs(token_ids, source["prompt_logprobs"])
    return EngineLogprobs("vllm", logprobs, token_ids, None, topk_ids, topk_logprobs)


def vllm_prompt_logprobs(
    token_ids: np.ndarray, prompt_logprobs: Sequence, topk: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read vLLM prompt log-probs of the prompt `token_ids` [N].

    Element i is null (element 0 always) or a mapping token id → entry, the entry a vLLM
    `Logprob` (offline RequestOutput: `.logprob`, `.rank`) or its JSON form {"logprob", "rank",
    ...} (keys may be strings such as "123"). vLLM lists the top-k (ranks 1..k) plus the actual
    token when it falls outside them. Returns logprobs [N] (NaN where null) and the top-k ids
    [N, k] int32 / log-probs [N, k] float64 sorted by rank (None when k is 0). `topk`: the k the
    engine was asked for; None: the widest k every position holds."""
    if isinstance(prompt_logprobs, (str, bytes, Mapping)) or not hasattr(
        prompt_logprobs, "__len__"
    ):
        raise EngineOutputError("'prompt_logprobs' must be a list (null or an object per token)")
    if len(prompt_logprobs) != len(token_ids):
        raise EngineOutputError(
            f"{len(prompt_logprobs)} 'prompt_logprobs' entries for {len(token_ids)} prompt tokens"
        )
    logprobs = np.full(len(token_ids), np.nan)  # [N]
    positions: list[tuple[int, int, list[Entry]]] = []  # (i, actual token, entries)
    for i, (token, entry) in enumerate(zip(token_ids.tolist(), prompt_logprobs)):
        if entry is None:
            continue
        entries = _vllm_entries(entry, i)
        actual = next((lp for tid, lp, _ in entries if tid == token), None)
        if actual is None:
            raise EngineOutputError(
                f"prompt_logprobs[{i}] has no entry for the actual token {token}"
            )
        logprobs[i] = actual
        positions.append((i, token, entries))
    k = _ranked_topk_width(positions) if topk is None else topk
    if k == 0:
        return logprobs, None, None
    topk_ids = np.zeros((len(token_ids), k), dtype=np.int32)  # [N, k]
    topk_logprobs = np.full((len(token_ids), k), np.nan)  # [N, k]
    for i, token, entries in positions:
        ranked = _top_by_rank(entries, token, k)
        if ranked is None:
            raise EngineOutputError(
                f"prompt_logprobs[{i}] does not hold a top-{k}: ranks "
                f"{sorted(rank for _, _, rank in entries)}"
            )
        topk_ids[i] = [tid for tid, _, _ in ranked]
        topk_logprobs[i] = [lp for _, lp, _ in ranked]
    return logprobs, topk_ids, topk_logprobs


def _vllm_entries(entry: Any, position: int) -> list[Entry]:
    """(id, log-prob, rank) of one prompt_logprobs element, values checked."""
    where = f"prompt_logprobs[{position}]"
    if not isinstance(entry, Mapping):
        raise EngineOutputError(f"{where} must be null or an object token id → {{logprob, rank}}")
    entries = []
    for key, value in entry.items():
        if isinstance(value, Mapping):
            logprob, rank = value.get("logprob"), value.get("rank")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            logprob, rank = value, None
        else:
            logprob, rank = getattr(value, "logprob", None), getattr(value, "rank", None)
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise EngineOutputError(f"{where} has the key {key!r}, not a token id") from None
        checked = check_logprob(logprob, f"{where}[{key}]")
        try:
            order = math.inf if rank is None else int(rank)
        except (TypeError, ValueError):
            raise EngineOutputError(
                f"{where}[{key}] has the rank {rank!r}, not an integer"
            ) from None
        entries.append((token, checked, order))
    return entries


def _top_by_rank(entries: list[Entry], actual: int, k: int) -> list[Entry] | None:
    """The k entries of ranks <= k, by rank (at a tie the listed top-k before the actual
    token); None if the entries do not hold them."""
    ranked = sorted(entries, key=lambda entry: (entry[2], entry[0] == actual))[:k]
    return ranked if len(ranked) == k and ranked[-1][2] <= k else None


def _ranked_topk_width(positions: list[tuple[int, int, list[Entry]]]) -> int:
    """The widest k such that every position holds its top-k; every position must then list
    k or k + 1 entries (the actual token added when outside the top-k)."""
    if not positions:
        return 0
    narrowest = min(len(entries) for _, _, entries in positions)
    k = next(
        (
            width
            for width in range(narrowest, 0, -1)
            if all(_top_by_rank(entries, token, width) for _, token, entries in positions)
        ),
        0,
    )
    counts = sorted({len(entries) for _, _, entries in positions})
    if not set(counts) <= {k, k + 1}:
        unranked = any(math.isinf(rank) for _, _, entries in positions for _, _, rank in entries)
        raise EngineOutputError(
            "prompt_logprobs entries have no 'rank': the top-k cannot be told apart"
            if unranked
            else f"inconsistent top-k: positions list {counts} entries (a top-{k} plus the actual "
            "token when outside it is k or k + 1 entries)"
        )
    return k


# ---------------------------------------------------------------------------------------------
# SGLang: meta_info.input_token_logprobs / input_top_logprobs of /generate or Engine.generate


def read_sglang(record: Mapping) -> EngineLogprobs:
    """`meta_info.input_token_logprobs` = [[logprob, id, text], ...] from logprob_start_len on
    (the first logprob null), `meta_info.input_top_logprobs` optional ([[logprob, id, text], ...]
    or null per position). `logprob_start_len` (top level or in meta_info, default 0) places
    them; with the request's `input_ids` the whole sequence is known and checked."""
    meta = record.get("meta_info")
    if not isinstance(meta, Mapping) or meta.get("input_token_logprobs") is None:
        raise EngineOutputError(
            "no 'meta_info.input_token_logprobs' (request with return_logprob=True, "
            "logprob_start_len=0)"
        )
    triples = _sglang_triples(meta["input_token_logprobs"], "meta_info.input_token_logprobs")
    token_ids = np.asarray([tid for tid, _ in triples], dtype=np.int64)  # [L]
    logprobs = np.asarray([lp for _, lp in triples], dtype=np.float64)  # [L], NaN: null
    topk_ids = topk_logprobs = None
    if meta.get("input_top_logprobs") is not None:
        topk_ids, topk_logprobs = _sglang_top(meta["input_top_logprobs"], len(triples))
    start = record.get("logprob_start_len", meta.get("logprob_start_len"))
    if start is not None and (not isinstance(start, int) or start < 0):
        raise EngineOutputError(f"'logprob_start_len' must be an integer >= 0, got {start!r}")
    if record.get("input_ids") is None:
        return EngineLogprobs(
            "sglang", logprobs, token_ids, None, topk_ids, topk_logprobs, start or 0
        )
    input_ids = int_array(record["input_ids"], "input_ids")  # [N]
    implied = len(input_ids) - len(token_ids)
    if implied < 0 or (start is not None and start != implied):
        raise EngineOutputError(
            f"{len(token_ids)} input_token_logprobs do not end the {len(input_ids)} input_ids "
            f"from logprob_start_len {start}"
        )
    if not np.array_equal(input_ids[implied:], token_ids):
        first = int(np.flatnonzero(input_ids[implied:] != token_ids)[0]) + implied
        raise EngineOutputError(f"input_token_logprobs and input_ids differ at position {first}")
    pad = np.full(implied, np.nan)  # the positions before logprob_start_len have no value
    if topk_ids is not None:
        topk_ids = np.concatenate([np.zeros((implied, topk_ids.shape[1]), np.int32), topk_ids])
        topk_logprobs = np.concatenate(
            [np.full((implied, topk_ids.shape[1]), np.nan), topk_logprobs]
        )
    logprobs = np.concatenate([pad, logprobs])
    return EngineLogprobs("sglang", logprobs, input_ids, None, topk_ids, topk_logprobs)


def _sglang_triples(triples: Any, name: str) -> list[tuple[int, float]]:
    """(id, log-prob; NaN for null) of a list of [logprob, token id, text] triples."""
    if not isinstance(triples, list):
        raise EngineOutputError(f"'{name}' must be a list of [logprob, token_id, text]")
    parsed = []
    for i, triple in enumerate(triples):
        if not isinstance(triple, (list, tuple)) or len(triple) < 2:
            raise EngineOutputError(f"{name}[{i}] is not [logprob, token_id, text]: {triple!r}")
        token = triple[1]
        if not isinstance(token, int) or isinstance(token, bool):
            raise EngineOutputError(f"{name}[{i}] has the token id {token!r}")
        value = math.nan if triple[0] is None else check_logprob(triple[0], f"{name}[{i}]")
        parsed.append((token, value))
    return parsed


def _sglang_top(top: Any, length: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-k ids [L, k] int32 and log-probs [L, k] (descending; NaN rows where null)."""
    name = "meta_info.input_top_logprobs"
    if not isinstance(top, list) or len(top) != length:
        raise EngineOutputError(f"'{name}' must have one element per input_token_logprobs entry")
    rows = {
        i: _sglang_triples(position, f"{name}[{i}]")
        for i, position in enumerate(top)
        if position is not None
    }
    widths = sorted({len(row) for row in rows.values()})
    if not widths or widths == [0]:
        return None, None
    if len(widths) > 1:
        raise EngineOutputError(f"inconsistent top-k in '{name}': rows of {widths} entries")
    topk_ids = np.zeros((length, widths[0]), dtype=np.int32)  # [L, k]
    topk_logprobs = np.full((length, widths[0]), np.nan)  # [L, k]
    for i, row in rows.items():
        if any(math.isnan(lp) for _, lp in row):
            raise EngineOutputError(f"{name}[{i}] has a null log-prob")
        row = sorted(row, key=lambda entry: -entry[1])
        topk_ids[i], topk_logprobs[i] = [tid for tid, _ in row], [lp for _, lp in row]
    return topk_ids, topk_logprobs


# ---------------------------------------------------------------------------------------------


def check_logprob(value: Any, name: str) -> float:
    """A log-prob value: a finite number <= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineOutputError(f"{name} = {value!r}: not a number")
    if not math.isfinite(value) or value > 0:
        raise EngineOutputError(f"{name} = {value}: log-probs must be finite and <= 0")
    return float(value)


def int_array(values: Any, name: str) -> np.ndarray:
    """[N] int64 of a list of token ids."""
    if not isinstance(values, (list, tuple, np.ndarray)) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise EngineOutputError(f"'{name}' must be a list of token ids")
    return np.asarray(values, dtype=np.int64).reshape(-1)
