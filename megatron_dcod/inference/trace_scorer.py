"""Per-token log-probs of traces under an HF causal LM (teacher or frozen initial student).

Used by tools/preprocess_traces.py `--score-with` (teacher log-probs, optional top-k) and
`--ref-model` (initial-student log-probs for iw-SFT). Output follows the alignment rule of
docs/data_format.md: element i is log p(token_i | tokens_<i), predicted by the logits at
position i-1; element 0 and unsupervised positions are 0.

Traces are sorted by length and packed into right-padded batches of at most `batch_tokens`
padded tokens. The model may run in bf16; the log-softmax is always fp32, done in sequence
chunks so that at most ~LOGITS_CHUNK_BYTES of fp32 log-probs exist beyond the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_dcod.inference.engine import length_sorted_batches
from megatron_dcod.inference.models import DTYPES, load_causal_lm, output_vocab_size

LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 log-softmax is done in sequence chunks of this size


@dataclass
class ScoredTrace:
    """Model log-probs of one trace, aligned with its tokens."""

    logprobs: np.ndarray  # [T] float32; 0 at position 0 and where loss_mask is 0
    topk_ids: np.ndarray | None = None  # [T, k] int32, the model's top-k at position i
    topk_logprobs: np.ndarray | None = None  # [T, k] float16, sorted descending


@dataclass
class _BatchLogProbs:
    """Log-probs of one padded batch, unshifted: column j predicts token j+1."""

    logp_target: np.ndarray  # [b, s-1] float32
    topk_ids: np.ndarray | None  # [b, s-1, k] int64
    topk_logp: np.ndarray | None  # [b, s-1, k] float32


def empty_scored_trace(topk: int) -> ScoredTrace:
    """The result for a trace without tokens (every scorer's)."""
    if not topk:
        return ScoredTrace(np.zeros(0, dtype=np.float32))
    return ScoredTrace(
        np.zeros(0, dtype=np.float32),
        np.zeros((0, topk), dtype=np.int32),
        np.zeros((0, topk), dtype=np.float16),
    )


def check_settings(dtype: str, batch_tokens: int) -> None:
    """A scorer's dtype and batch size (every scorer's check)."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"scoring dtype must be fp32 or bf16, got {dtype!r}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")


def check_vocabulary(model_dir, vocab_size: int, min_vocab_size: int | None, topk: int) -> None:
    """The scoring model predicts every id of the student tokenizer; top-k fits its output."""
    if min_vocab_size is not None and vocab_size < min_vocab_size:
        raise ValueError(
            f"scoring model {model_dir} predicts {vocab_size} tokens but the student "
            f"tokenizer has {min_vocab_size}: they must share the vocabulary"
        )
    if not 0 <= topk <= vocab_size:
        raise ValueError(f"topk must be in [0, {vocab_size}], got {topk}")


def check_trace(tokens: np.ndarray, loss_mask: np.ndarray, vocab_size: int) -> None:
    """Same lengths, token ids inside the scoring model's vocabulary (every scorer's check)."""
    if tokens.shape != loss_mask.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} differ")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids span [{tokens.min()}, {tokens.max()}], outside the scoring model's "
            f"vocabulary of {vocab_size}"
        )


class CausalLMScorer:
    """Batched forward passes of a local HF causal LM, log-softmax in fp32."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_tokens: int = 16384,
        topk: int = 0,
        min_vocab_size: int | None = None,
    ):
        check_settings(dtype, batch_tokens)
        self.model = load_causal_lm(model_dir, DTYPES[dtype]).to(device).eval()
        self.device, self.batch_tokens, self.topk = torch.device(device), batch_tokens, topk
        self.vocab_size = output_vocab_size(self.model)
        check_vocabulary(model_dir, self.vocab_size, min_vocab_size, topk)

    def score(self, traces: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[ScoredTrace]:
        """Score (tokens [T] int32, loss_mask [T] uint8) pairs; results in the input order."""
        for tokens, loss_mask in traces:
            self._check_trace(tokens, loss_mask)
        lengths = [len(tokens) for tokens, _ in traces]
        results = [self._empty_trace() for _ in traces]  # kept as is for 0-token traces
        nonempty = [index for index, length in enumerate(lengths) if length > 0]
        for batch in length_sorted_batches(nonempty, lengths, 2**62, self.batch_tokens):
            batch_logp = self._score_batch([traces[index][0] for index in batch])
            for row, index in enumerate(batch):
                loss_mask = traces[index][1]
                results[index] = self._aligned_trace(batch_logp, row, lengths[index], loss_mask)
        return results

    def _empty_trace(self) -> ScoredTrace:
        return empty_scored_trace(self.topk)

    def _check_trace(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        check_trace(tokens, loss_mask, self.vocab_size)

    @torch.inference_mode()
    def _score_batch(self, batch_tokens: list[np.ndarray]) -> _BatchLogProbs:
        """One right-padded forward pass; log-probs of each next token (and the top-k)."""
        longest = max(len(tokens) for tokens in batch_tokens)
        input_ids = torch.zeros(len(batch_tokens), longest, dtype=torch.long)  # [b, s]
        attention_mask = torch.zeros_like(input_ids)  # [b, s], 1 on real tokens
        for row, tokens in enumerate(batch_tokens):
            input_ids[row, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
            attention_mask[row, : len(tokens)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [b, s, v]
        return self._next_token_logprobs(logits[:, :-1], input_ids[:, 1:])

    def _next_token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> _BatchLogProbs:
        """fp32 log-softmax of logits [b, n, v] at targets [b, n], in sequence chunks."""
        batch_size, positions, vocab = logits.shape
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * batch_size * vocab))
        logp_target, topk_ids, topk_logp = [], [], []
        for start in range(0, max(positions, 1), chunk):  # one empty chunk when every row is 1
            logp = torch.log_softmax(logits[:, start : start + chunk].float(), dim=-1)  # [b, c, v]
            target = targets[:, start : start + chunk].unsqueeze(-1)  # [b, c, 1]
            logp_target.append(logp.gather(-1, target).squeeze(-1).cpu())  # [b, c]
            if self.topk:
                values, ids = logp.topk(self.topk, dim=-1)  # [b, c, k], sorted descending
                topk_logp.append(values.cpu())
                topk_ids.append(ids.cpu())
        return _BatchLogProbs(
            logp_target=torch.cat(logp_target, dim=1).numpy(),
            topk_ids=torch.cat(topk_ids, dim=1).numpy() if self.topk else None,
            topk_logp=torch.cat(topk_logp, dim=1).numpy() if self.topk else None,
        )

    def _aligned_trace(
        self, batch_logp: _BatchLogProbs, row: int, length: int, loss_mask: np.ndarray
    ) -> ScoredTrace:
        """Shift by one (element i describes token i); zero element 0 and unsupervised ones."""
        unsupervised = ~loss_mask.astype(bool)  # [T]
        unsupervised[:1] = True
        logprobs = np.zeros(length, dtype=np.float32)  # [T]
        logprobs[1:] = batch_logp.logp_target[row, : length - 1]
        logprobs[unsupervised] = 0.0
        if not self.topk:
            return ScoredTrace(logprobs)
        topk_ids = np.zeros((length, self.topk), dtype=np.int32)  # [T, k]
        topk_logprobs = np.zeros((length, self.topk), dtype=np.float16)  # [T, k]
        topk_ids[1:] = batch_logp.topk_ids[row, : length - 1]
        topk_logprobs[1:] = batch_logp.topk_logp[row, : length - 1]
        topk_ids[unsupervised], topk_logprobs[unsupervised] = 0, 0.0
        return ScoredTrace(logprobs, topk_ids, topk_logprobs)
