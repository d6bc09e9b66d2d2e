"""OpenAI-compatible completions responses as engine records (data/engine_records.py): a
completions request with echo=true, logprobs=K and max_tokens 0 or 1 on the rendered sequence.

Tokens named `token_id:N` (vLLM's `--return-tokens-as-token-ids`) give ids; other token strings
are kept and checked against the student's tokens decoded one by one (data/engine_align.py). A
top-k named by token text cannot be mapped to ids reliably and is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from megatron_dcod.data.engine_records import EngineLogprobs, EngineOutputError, check_logprob
from megatron_dcod.data.engine_records import only_choice

_TOKEN_ID = re.compile(r"token_id:(\d+)")  # vLLM's --return-tokens-as-token-ids token strings


def read_openai(record: Mapping) -> EngineLogprobs:
    """`choices[0].logprobs` with `tokens`, `token_logprobs` (first null) and optional
    `top_logprobs` (per token {token string: logprob}, first null). Tokens `token_id:N` (vLLM
    `--return-tokens-as-token-ids`) give ids; other strings are checked against the student's
    tokens. `usage.completion_tokens` generated tokens are dropped from the end; without
    `usage`, up to one token past the sequence is (max_tokens=1)."""
    choice = only_choice(record)
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("tokens"), list):
        raise EngineOutputError(
            "no 'choices[0].logprobs.tokens' (completions request with echo=true, logprobs=K)"
        )
    tokens, values = logprobs["tokens"], logprobs.get("token_logprobs")
    top = logprobs.get("top_logprobs")
    if not isinstance(values, list) or len(values) != len(tokens):
        raise EngineOutputError("'token_logprobs' must list one value (or null) per token")
    if top is not None and (not isinstance(top, list) or len(top) != len(tokens)):
        raise EngineOutputError("'top_logprobs' must list one object (or null) per token")
    generated, extra_tail = _generated_count(record)
    keep = len(tokens) - generated
    tokens, values, top = tokens[:keep], values[:keep], None if top is None else top[:keep]
    if not all(isinstance(token, str) for token in tokens):
        raise EngineOutputError("'tokens' must be strings")
    matches = [_TOKEN_ID.fullmatch(token) for token in tokens]
    ids = np.asarray([int(m.group(1)) for m in matches], np.int64) if all(matches) else None
    parsed = np.asarray(
        [
            math.nan if v is None else check_logprob(v, f"token_logprobs[{i}]")
            for i, v in enumerate(values)
        ],
        dtype=np.float64,
    )  # [N]
    topk_ids = topk_logprobs = None
    if top is not None and any(position for position in top):
        if ids is None:
            _refuse_text_topk(top)
        else:
            topk_ids, topk_logprobs = _openai_topk(top, ids)
    texts = None if ids is not None else list(tokens)
    return EngineLogprobs("openai", parsed, ids, texts, topk_ids, topk_logprobs, 0, extra_tail)


def _generated_count(record: Mapping) -> tuple[int, int]:
    """(tokens to drop from the end, further tokens that may pass the sequence)."""
    usage = record.get("usage")
    generated = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    if generated is None:
        return 0, 1
    if not isinstance(generated, int) or generated < 0:
        raise EngineOutputError(f"'usage.completion_tokens' is {generated!r}")
    return generated, 0


def _refuse_text_topk(top: list) -> None:
    """Top-k named by token text cannot be mapped to ids; one entry per token (logprobs=0,
    just the token itself) carries no top-k and passes."""
    if any(isinstance(position, Mapping) and len(position) > 1 for position in top):
        raise EngineOutputError(
            "'top_logprobs' name tokens by their text, which cannot be mapped to token ids "
            "reliably: serve with vLLM's --return-tokens-as-token-ids (tokens 'token_id:N'), or "
            "request logprobs=0, or remove 'top_logprobs' from the records"
        )


def _openai_topk(top: list, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-k [N, k] from {"token_id:N": logprob} objects holding the top-k and the actual token
    (k or k + 1 entries, as vLLM writes them). There are no ranks: when every object lists the
    same n entries and the actual token is always the least likely of them, the top-k is read as
    the n - 1 others (a top-n ending with the actual token cannot be told apart from that)."""
    rows: dict[int, list[tuple[int, float]]] = {}
    for i, position in enumerate(top):
        if position is None:
            continue
        if not isinstance(position, Mapping):
            raise EngineOutputError(f"top_logprobs[{i}] must be null or an object")
        row = []
        for key, value in position.items():
            match = _TOKEN_ID.fullmatch(key) if isinstance(key, str) else None
            if match is None:
                raise EngineOutputError(f"top_logprobs[{i}] has the key {key!r}, not 'token_id:N'")
            row.append((int(match.group(1)), check_logprob(value, f"top_logprobs[{i}][{key}]")))
        rows[i] = sorted(row, key=lambda entry: -entry[1])
    counts = sorted({len(row) for row in rows.values()})
    if len(counts) > 2 or counts[-1] - counts[0] > 1:
        raise EngineOutputError(f"inconsistent top-k: top_logprobs objects of {counts} entries")
    k = counts[0] if len(counts) == 2 or _actual_inside(rows, ids) else counts[0] - 1
    if k == 0:
        return None, None
    topk_ids = np.zeros((len(top), k), dtype=np.int32)  # [N, k]
    topk_logprobs = np.full((len(top), k), np.nan)  # [N, k]
    for i, row in rows.items():
        if len(row) == k + 1:  # the actual token is outside the top-k
            row = [entry for entry in row if entry[0] != ids[i]][:k]
        topk_ids[i], topk_logprobs[i] = [tid for tid, _ in row], [lp for _, lp in row]
    return topk_ids, topk_logprobs


def _actual_inside(rows: dict[int, list[tuple[int, float]]], ids: np.ndarray) -> bool:
    """Whether some position shows its actual token inside the top-k (not strictly the least
    likely entry): then every object holds exactly the top-k."""
    for i, row in rows.items():
        others = [lp for tid, lp in row if tid != ids[i]]
        actual = [lp for tid, lp in row if tid == ids[i]]
        if len(others) < len(row) and others and actual[0] >= min(others):
            return True
    return False
