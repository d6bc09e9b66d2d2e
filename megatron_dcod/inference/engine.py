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
from typing import Protocol, Sequence

import torch

FINISH_REASONS = ("stop", "eos", "length")


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
        self, contexts: Sequence[list[int]], sampling: SamplingConfig, seeds: Sequence[int]
    ) -> list[Generation]:
        """One generation per context; seeds[i] seeds context i where the backend can."""

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
