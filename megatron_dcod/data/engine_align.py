"""Engine outputs (data/engine_records.py) → the teacher arrays of one trace.

The engine's tokens must be the student tokenization of the rendered conversation, position by
position (element i of the engine's prompt log-probs is log p(token_i | tokens_<i), the dataset's
alignment rule). The values at the supervised positions (loss mask 1) become the trace's teacher
arrays, 0 elsewhere, as for records with native teacher arrays (data/encode.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_dcod.data.engine_records import EngineLogprobs, EngineOutputError


def engine_teacher_arrays(
    engine: EngineLogprobs, tokens: np.ndarray, loss_mask: np.ndarray, tokenizer: Any
) -> dict[str, np.ndarray]:
    """teacher_logprobs [T] (and teacher_topk_ids / teacher_topk_logprobs [T, k]) of the trace
    with `tokens` [T] and `loss_mask` [T], from `engine`; EngineOutputError naming the first
    position that does not fit. `tokenizer`: the student's HF tokenizer (messages, token text)."""
    _check_tokens(engine, tokens, tokenizer)
    supervised = np.flatnonzero(loss_mask)  # [R] positions of the supervised tokens
    offsets = supervised - engine.start  # [R] their elements in the engine's arrays
    if len(supervised) and offsets[0] < 0:
        raise EngineOutputError(
            f"supervised position {supervised[0]} lies before logprob_start_len {engine.start}: "
            "the engine gave it no log-prob"
        )
    values = engine.logprobs[offsets]  # [R]
    _require(np.isnan(values), supervised, tokens, tokenizer, f"the {engine.format} log-prob")
    length = len(tokens)
    arrays = {"teacher_logprobs": np.zeros(length, dtype=np.float32)}
    arrays["teacher_logprobs"][supervised] = values
    if engine.topk_ids is not None:
        rows = engine.topk_logprobs[offsets]  # [R, k]
        _require(np.isnan(rows).any(axis=1), supervised, tokens, tokenizer, "the top-k")
        k = engine.topk_ids.shape[1]
        arrays["teacher_topk_ids"] = np.zeros((length, k), dtype=np.int32)  # [T, k]
        arrays["teacher_topk_logprobs"] = np.zeros((length, k), dtype=np.float16)  # [T, k]
        arrays["teacher_topk_ids"][supervised] = engine.topk_ids[offsets]
        arrays["teacher_topk_logprobs"][supervised] = rows
    return arrays


def _require(missing: np.ndarray, supervised: np.ndarray, tokens, tokenizer, what: str) -> None:
    """EngineOutputError at the first supervised position whose value is null."""
    if missing.any():
        position = int(supervised[np.argmax(missing)])
        shown = tokenizer.convert_ids_to_tokens(int(tokens[position]))
        raise EngineOutputError(
            f"{what} is null at supervised position {position} (token {shown!r}): every "
            "supervised token needs one"
        )


def _check_tokens(engine: EngineLogprobs, tokens: np.ndarray, tokenizer: Any) -> None:
    """The engine's tokens equal the student's from position `start` to the end of the
    sequence; at most `extra_tail` engine tokens may follow it."""
    count, length = len(engine.logprobs), len(tokens)
    overlap = max(0, min(count, length - engine.start))  # engine elements inside the sequence
    student = tokens[engine.start : engine.start + overlap].astype(np.int64)  # [overlap]
    if engine.token_ids is not None:
        differs = np.flatnonzero(engine.token_ids[:overlap] != student)
        engine_side = engine.token_ids
    else:
        differs = _text_differences(engine.token_texts[:overlap], student, tokenizer)
        engine_side = engine.token_texts
    end = engine.start + count
    cover = (
        f"{count} engine tokens from position {engine.start}, {length} student tokens; "
        "the engine must score the student's tokenization of the chat-template-rendered "
        "conversation (a token-id prompt, nothing added) with the student's vocabulary"
    )
    if len(differs):
        first = int(differs[0])
        ours = student[first : first + 3].tolist()
        if engine.token_ids is not None:  # vocabulary pieces on both sides
            theirs = tokenizer.convert_ids_to_tokens(engine_side[first : first + 3].tolist())
            ours = tokenizer.convert_ids_to_tokens(ours)
        else:  # token strings: the student's tokens decoded one by one
            theirs, ours = engine_side[first : first + 3], [tokenizer.decode([t]) for t in ours]
        raise EngineOutputError(
            f"the {engine.format} tokens do not match the student tokenization: first difference "
            f"at position {engine.start + first}: engine {list(theirs)} vs student {ours} "
            f"({cover})"
        )
    if not length <= end <= length + engine.extra_tail:
        tail = (
            f" (at most {engine.extra_tail} generated token may follow)"
            if engine.extra_tail
            else ""
        )
        raise EngineOutputError(
            f"the {engine.format} output ends at position {end - 1}, the sequence at "
            f"{length - 1}{tail} ({cover})"
        )


def _text_differences(texts: list[str], ids: np.ndarray, tokenizer: Any) -> np.ndarray:
    """Positions where the engine's token string is not the student token decoded alone (the
    tokenizer's decode with or without its clean-up, or the raw vocabulary piece)."""
    decoded = tokenizer.backend_tokenizer.decode_batch(
        [[token] for token in ids.tolist()], skip_special_tokens=False
    )
    differs = []
    for position, (text, alone, token) in enumerate(zip(texts, decoded, ids.tolist())):
        if text == alone:
            continue
        if text not in (tokenizer.decode([token]), tokenizer.convert_ids_to_tokens(token)):
            differs.append(position)
    return np.asarray(differs, dtype=np.int64)
