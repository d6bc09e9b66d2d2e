"""The Hugging Face transformers engine (CPU or GPU): batched, left-padded, with the KV cache.

Generation is a plain decoding loop over `model(...)` with the cache rather than
`model.generate`, so that every sequence samples from its own seeded generator: a sequence's
tokens do not depend on which other sequences share its batch, and a batched run equals a
one-at-a-time run. Contexts are sorted by length so that similar lengths share a batch.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch

from megatron_dcod.inference.engine import Generation, SamplingConfig, Score, end_at_stop
from megatron_dcod.inference.engine import context_check, failed_generation, failed_score
from megatron_dcod.inference.engine import length_sorted_batches, run_isolated
from megatron_dcod.inference.models import DTYPES, context_length, load_causal_lm
from megatron_dcod.inference.models import stop_token_ids

STOP_WINDOW_SLACK = 4  # tokens decoded beyond a stop string's length when looking for it


class HFEngine:
    """Generate and score with a local HF causal LM."""

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        batch_tokens: int = 16384,
    ):
        self.model = load_causal_lm(model_dir, DTYPES[dtype]).to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        pad_id = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
        self.stop_ids = stop_token_ids(self.model.generation_config, tokenizer)
        self.context = context_length(self.model)
        self._pieces: dict[int, str] = {}  # token id -> its text alone (stop-string filter)
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        """transformers ≥ 5.2x names the KV cache `cache`; earlier releases `past_key_values`."""

    def generate(
        self,
        contexts: Sequence[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        limits = max_new_tokens or [sampling.max_new_tokens] * len(contexts)

        def run(batch: list[int]) -> list[Generation]:
            return self._decode_batch(
                [contexts[i] for i in batch], sampling, [seeds[i] for i in batch],
                [limits[i] for i in batch],
            )  # fmt: skip

        lengths = [len(context) for context in contexts]
        batches = length_sorted_batches(range(len(lengths)), lengths, self.batch_size, 2**62)
        return run_isolated(
            batches, len(contexts), context_check(contexts, self.context), run, failed_generation
        )

    def score(self, requests: Sequence[tuple[list[int], list[int]]], topk: int) -> list[Score]:
        def invalid(i: int) -> str | None:
            context, continuation = requests[i]
            if not context:
                return "empty context: the first continuation token has nothing to condition on"
            if len(context) + len(continuation) > self.context:
                total = len(context) + len(continuation)
                return f"{total} tokens exceed the model's context ({self.context})"
            return None

        def run(batch: list[int]) -> list[Score]:
            return self._score_batch([requests[i] for i in batch], topk)

        lengths = [len(context) + len(continuation) for context, continuation in requests]
        batches = length_sorted_batches(range(len(lengths)), lengths, 2**62, self.batch_tokens)
        return run_isolated(batches, len(requests), invalid, run, failed_score)

    @torch.inference_mode()
    def _decode_batch(
        self, contexts: list[list[int]], sampling: SamplingConfig, seeds: list[int], limits
    ) -> list[Generation]:
        input_ids, attention_mask = _left_padded(contexts, self.pad_id)  # [b, s] each
        limits = [min(limit, self.context - len(ids)) for limit, ids in zip(limits, contexts)]
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [b, s]
        new_ids: list[list[int]] = [[] for _ in contexts]
        finish: list[str | None] = ["length" if limit <= 0 else None for limit in limits]
        inputs, cache = input_ids, None
        while not all(finish):
            output = self.model(
                input_ids=inputs.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_argument: cache},
            )
            cache = getattr(output, self._cache_argument)
            chosen = _next_tokens(output.logits[:, -1].float(), sampling, generators)  # [b]
            for row, token in enumerate(chosen):
                if finish[row] is None:
                    finish[row] = self._append(new_ids[row], token, sampling.stop)
                if finish[row] is None and len(new_ids[row]) >= limits[row]:
                    finish[row] = "length"  # max new tokens, or the model's context is full
            inputs = torch.tensor(chosen, dtype=torch.long).unsqueeze(1)  # [b, 1]
            attention_mask = torch.cat([attention_mask, torch.ones_like(inputs)], dim=1)
            positions = positions[:, -1:] + 1  # [b, 1]
        return [
            self._generation(ids, reason, sampling.stop) for ids, reason in zip(new_ids, finish)
        ]

    def _append(self, ids: list[int], token: int, stop: tuple[str, ...]) -> str | None:
        """Add one generated token; the finish reason when the sequence has ended."""
        if token in self.stop_ids:
            return "eos"
        ids.append(token)
        if stop and self._may_end_a_stop_string(token, stop):
            window = max(len(string) for string in stop) + STOP_WINDOW_SLACK
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
            if any(string and string in tail for string in stop):
                return "stop"
        return None

    def _may_end_a_stop_string(self, token: int, stop: tuple[str, ...]) -> bool:
        """False when the token cannot complete a stop string: its text lacks every stop
        string's last character (a partial UTF-8 byte, or a stop ending in whitespace, which
        some tokenizers drop from a lone token's text, always counts as possible)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return "\ufffd" in piece or any(
            string and (string[-1] in piece or string[-1].isspace()) for string in stop
        )

    def _generation(self, ids: list[int], reason: str, stop: tuple[str, ...]) -> Generation:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            text = end_at_stop(text, stop) or text
        return Generation(text, ids, reason)

    @torch.inference_mode()
    def _score_batch(self, requests: list[tuple[list[int], list[int]]], topk: int) -> list[Score]:
        input_ids, attention_mask = _left_padded([c + n for c, n in requests], self.pad_id)
        keep = max(len(continuation) for _, continuation in requests) + 1
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            logits_to_keep=keep,
        ).logits  # [b, keep, v]: column keep-1 predicts the token after each sequence
        scores = []
        for row, (_, continuation) in enumerate(requests):
            predicting = logits[row, keep - len(continuation) - 1 :].float()  # [c+1, v]
            logp = torch.log_softmax(predicting, dim=-1)  # [c+1, v]
            targets = torch.tensor(continuation, dtype=torch.long, device=logp.device)
            if not torch.isfinite(logp).all():
                scores.append(Score(error="scoring failed: non-finite logits"))
                continue
            score = Score(logp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist())
            if topk:
                values, ids = logp[-1].topk(topk)  # [k], sorted descending
                score.next_topk_ids, score.next_topk_logprobs = ids.tolist(), values.tolist()
            scores.append(score)
        return scores


def _left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [b, s], attention_mask [b, s]) with every sequence ending in column s-1."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


def _next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generators) -> list[int]:
    """Greedy, or temperature + top-p sampling by inverse CDF with one uniform draw from each
    row's own generator (so a row's tokens do not depend on its batch); logits [b, v]."""
    if not torch.isfinite(logits).all():  # the failing rows are then isolated and reported
        raise ValueError("non-finite logits")
    if sampling.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # [b, v]
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # the first stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    cdf = probs.cumsum(dim=-1)  # [b, v]
    uniforms = torch.stack(
        [torch.rand((), generator=g, device=probs.device) for g in generators]
    )  # [b]
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [b, 1]
    chosen = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # skips zero-mass ids
    return chosen.clamp(max=probs.shape[-1] - 1).tolist()
