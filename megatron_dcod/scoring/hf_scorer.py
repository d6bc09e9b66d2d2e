"""Per-token log-probs of traces under an HF causal LM (teacher or frozen initial student).

Used by tools/preprocess_traces.py `--score-with` (teacher log-probs, optional top-k) and
`--ref-model` (initial-student log-probs for iw-SFT). Output follows the alignment rule of
DESIGN.md §4: element i is log p(token_i | tokens_<i), predicted by the logits at position i-1;
element 0 and unsupervised positions are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 log-softmax is done in sequence chunks of this size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ScoredTrace:
    """Model log-probs of one trace, aligned with its tokens."""

    logprobs: np.ndarray  # [T] float32; 0 at position 0 and where loss_mask is 0
    topk_ids: np.ndarray | None = None  # [T, k] int32, the model's top-k at position i
    topk_logprobs: np.ndarray | None = None  # [T, k] float16, sorted descending


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
        from transformers import AutoModelForCausalLM

        if not Path(model_dir, "config.json").is_file():
            raise ValueError(f"scoring model dir {model_dir} has no config.json")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=DTYPES[dtype], local_files_only=True
            )
        except Exception as error:  # transformers raises many types for unreadable weights
            raise ValueError(f"cannot load a causal LM from {model_dir}: {error}") from error
        self.model.to(device).eval()
        self.device, self.batch_tokens, self.topk = torch.device(device), batch_tokens, topk
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        if min_vocab_size is not None and self.vocab_size < min_vocab_size:
            raise ValueError(
                f"scoring model {model_dir} predicts {self.vocab_size} tokens but the student "
                f"tokenizer has {min_vocab_size}: they must share the vocabulary"
            )

    def score(self, traces: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[ScoredTrace]:
        """Score (tokens [T], loss_mask [T]) pairs; results in the input order."""
        results: list[ScoredTrace | None] = [None] * len(traces)
        for batch in self._length_sorted_batches([len(tokens) for tokens, _ in traces]):
            for index, scored in zip(batch, self._score_batch([traces[i] for i in batch])):
                results[index] = scored
        return results

    def _length_sorted_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped so that batch size × longest length stays within batch_tokens."""
        batches, current = [], []
        for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
            longest = lengths[current[0]] if current else lengths[index]
            if current and (len(current) + 1) * longest > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(index)
        return batches + ([current] if current else [])

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> list[ScoredTrace]:
        lengths = [len(tokens) for tokens, _ in batch]
        input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # [b, s]
        attention_mask = torch.zeros_like(input_ids)  # [b, s], right padding
        for row, (tokens, _) in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
            attention_mask[row, : len(tokens)] = 1
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits  # [b, s, v]
        targets = input_ids[:, 1:].to(self.device)  # [b, s-1]: token i+1 is predicted at i
        logp_target, topk_ids, topk_logp = self._gather(logits[:, :-1], targets)
        return [
            self._aligned(logp_target[row], topk_ids, topk_logp, row, length, loss_mask)
            for row, (length, (_, loss_mask)) in enumerate(zip(lengths, batch))
        ]

    def _gather(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
        """fp32 log-softmax over the vocabulary, in sequence chunks to bound memory."""
        batch, positions, vocab = logits.shape
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * batch * vocab))
        logp_target, topk_ids, topk_logp = [], [], []
        for start in range(0, max(positions, 1), chunk):  # one (empty) chunk for 1-token rows
            logp = torch.log_softmax(logits[:, start : start + chunk].float(), dim=-1)  # [b, c, v]
            target = targets[:, start : start + chunk]  # [b, c]
            logp_target.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1))  # [b, c]
            if self.topk:
                values, ids = logp.topk(self.topk, dim=-1)  # [b, c, k], sorted descending
                topk_logp.append(values)
                topk_ids.append(ids)
        cat = lambda parts: torch.cat(parts, dim=1).cpu().numpy() if parts else None  # noqa: E731
        return cat(logp_target), cat(topk_ids), cat(topk_logp)

    def _aligned(self, logp_target, topk_ids, topk_logp, row, length, loss_mask) -> ScoredTrace:
        """Shift by one (element i describes token i), zero element 0 and unsupervised ones."""
        supervised = loss_mask.astype(bool)  # [T]
        supervised[0] = False
        logprobs = np.zeros(length, dtype=np.float32)
        logprobs[1:] = logp_target[: length - 1]
        logprobs[~supervised] = 0.0
        if not self.topk:
            return ScoredTrace(logprobs)
        ids = np.zeros((length, self.topk), dtype=np.int32)
        values = np.zeros((length, self.topk), dtype=np.float16)
        ids[1:] = topk_ids[row, : length - 1]
        values[1:] = topk_logp[row, : length - 1]
        ids[~supervised], values[~supervised] = 0, 0.0
        return ScoredTrace(logprobs, ids, values)
