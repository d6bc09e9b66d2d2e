"""What every inference engine takes and returns, and which engine a run gets.

An engine has two operations over batches of token-id contexts:

- `generate(contexts, sampling, seeds)`: per context a `Generation` — the new text, its token
  ids and why it ended (`stop`: a stop string, `eos`, `length`: max new tokens or the model's
  context). The text of a `stop` generation ends with the stop string (it is kept, unlike
  servers that trim it); `token_ids` are the tokens generated, so the last one may run past the
  stop string.
- `score(requests, topk)`: per (context, continuation) a `Score` — the raw (temperature 1)
  log-prob of every continuation token, and the top-k log-probs of the next token after the
  continuation, from one forward pass.

A request that fails (too long for the model, a failure that repeats when it runs alone) comes
back with `error` set instead of raising, so the caller decides what a failure means.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar

import torch

Result = TypeVar("Result")


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings of one generate call."""

    temperature: float
    """0: greedy."""
    top_p: float
    max_new_tokens: int
    seed: int
    """Base seed of the run (each sequence gets its own seed in `generate`)."""
    stop: tuple[str, ...] = ()
    """Strings that end a generation; the text keeps the stop string."""


@dataclass
class Generation:
    """One generated continuation."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, the EOS token excluded."""
    finish_reason: str | None = None
    """'stop', 'eos' or 'length'; None when `error` is set."""
    error: str | None = None
    """Why nothing was generated."""

    @property
    def truncated(self) -> bool:
        """Cut off by max new tokens or the model's context rather than ended by the model."""
        return self.finish_reason == "length"


@dataclass
class Score:
    """The scoring model's view of one (context, continuation) pair."""

    logprobs: list[float] = field(default_factory=list)
    """Raw log-prob of each continuation token given everything before it."""
    next_topk_ids: list[int] = field(default_factory=list)
    """Top-k ids of the next token after the continuation, most likely first."""
    next_topk_logprobs: list[float] = field(default_factory=list)
    """Their raw log-probs (the full-vocabulary log-softmax, not renormalized)."""
    error: str | None = None
    """Why it could not be scored (the other fields are then empty)."""


class Engine(Protocol):
    name: str

    def generate(
        self,
        contexts: Sequence[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """One generation per context; seeds[i] seeds context i where the backend can;
        max_new_tokens[i], when given, replaces sampling.max_new_tokens for context i."""

    def score(self, requests: Sequence[tuple[list[int], list[int]]], topk: int) -> list[Score]:
        """One score per (context, continuation); topk=0 skips the next-token top-k."""


def choose_backend(requested: str) -> str:
    """'auto' -> 'vllm' if vLLM is importable and a GPU is visible, else 'hf'."""
    if requested == "auto":
        has_vllm = importlib.util.find_spec("vllm") is not None
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    if requested == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm: vLLM is not installed")
    if requested not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {requested!r} (auto, hf, vllm)")
    return requested


def end_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` cut just after the first stop string it contains; None when it has none."""
    ends = [text.find(string) + len(string) for string in stop if string and string in text]
    return text[: min(ends)] if ends else None


def context_check(contexts: Sequence[list[int]], context_length: int):
    """`invalid(i)` for run_isolated: a context that leaves no room for a new token."""

    def too_long(i: int) -> str | None:
        if len(contexts[i]) >= context_length:
            return f"context of {len(contexts[i])} tokens fills the model's ({context_length})"
        return None

    return too_long


def run_isolated(
    batches: list[list[int]],
    count: int,
    invalid: Callable[[int], str | None],
    run: Callable[[list[int]], list[Result]],
    failed: Callable[[str], Result],
) -> list[Result]:
    """Run each batch of request indices; a batch that fails is split in halves until the
    failing requests stand alone, so that only they fail. `invalid(i)` rejects a request
    before any work."""
    results: list[Result | None] = [None] * count
    for batch in batches:
        for index in batch:
            reason = invalid(index)
            if reason is not None:
                results[index] = failed(reason)
        todo = [index for index in batch if results[index] is None]
        for index, result in zip(todo, _run_or_split(todo, run, failed)):
            results[index] = result
    return results


def _run_or_split(batch: list[int], run, failed) -> list:
    if not batch:
        return []
    try:
        return run(batch)
    except Exception as error:  # OOM, NaN logits, a rejected request: bisect
        if len(batch) == 1:
            return [failed(f"{error!r}"[:500])]
        half = len(batch) // 2
        return _run_or_split(batch[:half], run, failed) + _run_or_split(batch[half:], run, failed)


def failed_generation(reason: str) -> Generation:
    return Generation("", error=f"generation failed: {reason}")


def failed_score(reason: str) -> Score:
    return Score(error=f"scoring failed: {reason}")


def length_sorted_batches(
    indices: Sequence[int], lengths: Sequence[int], max_rows: int, max_tokens: int
) -> list[list[int]]:
    """`indices` longest first, grouped so that rows ≤ max_rows and rows × longest length ≤
    max_tokens (similar lengths share a batch; one request over the budget still forms one)."""
    batches, current = [], []
    for index in sorted(indices, key=lambda i: -lengths[i]):
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= max_rows or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])
