"""Per-token log-probs of traces with offline vLLM: `--score-backend vllm` of
tools/preprocess_traces.py (`--score-with`, `--ref-model`).

Same contract as trace_scorer.CausalLMScorer: element i is log p(token_i | tokens_<i), 0 at
element 0 and where loss_mask is 0; the top-k is sorted descending (int32 ids, float16
log-probs). Each trace is one token-id prompt scored with prompt log-probs
(`prompt_logprobs=max(k, 1)`; the one generated token is thrown away) at temperature 1 with no
top-p / top-k, and `logprobs_mode="raw_logprobs"` where the installed vLLM has that setting: the
model's raw distribution, whatever sampling would use. Prefix caching is off: a scoring run
reuses nothing, and older vLLM versions refused or mis-scored prompt log-probs with it on.
vLLM's answer is read by data/engine_records.vllm_prompt_logprobs, the reader of vLLM records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_dcod.data.engine_records import EngineOutputError, vllm_prompt_logprobs
from megatron_dcod.inference.trace_scorer import (
    ScoredTrace,
    check_settings,
    check_trace,
    check_vocabulary,
    empty_scored_trace,
)
from megatron_dcod.inference.vllm_engine import RAW_ONE_TOKEN, VLLM_DTYPES


class VLLMTraceScorer:
    """Prompt log-probs of traces from one offline `vllm.LLM` (`tensor_parallel_size` GPUs)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "bf16",
        batch_tokens: int = 16384,
        topk: int = 0,
        min_vocab_size: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
    ):
        check_settings(dtype, batch_tokens)
        self.vocab_size = _model_vocab_size(model_dir)
        check_vocabulary(model_dir, self.vocab_size, min_vocab_size, topk)
        self.batch_tokens, self.topk = batch_tokens, topk
        self.llm = _load_llm(model_dir, dtype, topk, tensor_parallel_size, gpu_memory_utilization)
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.context = getattr(config, "max_model_len", None) or 2**31

    def score(self, traces: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[ScoredTrace]:
        """Score (tokens [T] int32, loss_mask [T] uint8) pairs; results in the input order."""
        for tokens, loss_mask in traces:
            self._check_trace(tokens, loss_mask)
        results = [empty_scored_trace(self.topk) for _ in traces]  # kept as is for 0-token traces
        batch: list[int] = []
        batch_tokens = 0
        for index in [i for i, (tokens, _) in enumerate(traces) if len(tokens)] + [None]:
            length = 0 if index is None else len(traces[index][0])
            if batch and (index is None or batch_tokens + length > self.batch_tokens):
                outputs = self._generate([traces[i][0] for i in batch])
                for i, output in zip(batch, outputs):
                    results[i] = self._aligned_trace(*traces[i], output)
                batch, batch_tokens = [], 0
            if index is not None:
                batch.append(index)
                batch_tokens += length
        return results

    def _generate(self, sequences: list[np.ndarray]) -> list:
        """One generate call: prompt log-probs of each sequence, one throw-away token."""
        from vllm import SamplingParams

        params = SamplingParams(
            **RAW_ONE_TOKEN,
            prompt_logprobs=max(self.topk, 1),  # the actual token's entry is always there too
            detokenize=False,
        )
        prompts = [{"prompt_token_ids": tokens.astype(np.int64).tolist()} for tokens in sequences]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _aligned_trace(self, tokens: np.ndarray, loss_mask: np.ndarray, output) -> ScoredTrace:
        """Element i describes token i already; zero element 0 and the unsupervised ones."""
        ids = tokens.astype(np.int64)  # [T]
        try:
            logprobs, topk_ids, topk_logprobs = vllm_prompt_logprobs(
                ids, output.prompt_logprobs, self.topk
            )
        except EngineOutputError as error:
            raise RuntimeError(f"unexpected vLLM prompt log-probs: {error}") from error
        unsupervised = ~loss_mask.astype(bool)  # [T]
        unsupervised[:1] = True
        if np.isnan(logprobs[~unsupervised]).any():
            raise RuntimeError("vLLM returned no prompt log-prob for a supervised token")
        scored = ScoredTrace(np.where(unsupervised, 0.0, logprobs).astype(np.float32))  # [T]
        if self.topk:
            scored.topk_ids = np.where(unsupervised[:, None], 0, topk_ids).astype(np.int32)
            values = np.where(unsupervised[:, None], 0.0, topk_logprobs)  # [T, k]
            scored.topk_logprobs = values.astype(np.float16)
        return scored

    def _check_trace(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        """Same lengths, ids inside the vocabulary, room for the one generated token."""
        check_trace(tokens, loss_mask, self.vocab_size)
        if len(tokens) + 1 > self.context:
            raise ValueError(
                f"a trace of {len(tokens)} tokens does not fit the scoring model's context of "
                f"{self.context} (vLLM max_model_len) with the generated token: lower "
                "--max-seq-length"
            )


def _load_llm(model_dir, dtype: str, topk: int, tensor_parallel_size: int, memory: float | None):
    """The offline engine: prefix caching off, room for the top-k, raw log-probs."""
    from vllm import LLM

    settings = dict(
        model=str(model_dir),
        dtype=VLLM_DTYPES[dtype],
        tensor_parallel_size=tensor_parallel_size,
        enable_prefix_caching=False,
        max_logprobs=max(topk, 1),
        generation_config="vllm",  # no sampling defaults inherited from the model
    )
    if memory is not None:
        settings["gpu_memory_utilization"] = memory
    if _has_logprobs_mode():  # newer vLLM: its default there, said explicitly
        settings["logprobs_mode"] = "raw_logprobs"
    return LLM(**settings)


def _has_logprobs_mode() -> bool:
    """Whether the installed vLLM's engine arguments have `logprobs_mode`."""
    try:
        from vllm import EngineArgs

        return "logprobs_mode" in {field.name for field in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):  # no EngineArgs, or not a dataclass
        return False


def _model_vocab_size(model_dir: str | Path) -> int:
    """The vocabulary the model predicts (its config's), read before vLLM starts."""
    from transformers import AutoConfig

    if not Path(model_dir, "config.json").is_file():
        raise ValueError(f"model dir {model_dir} has no config.json")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return int(config.get_text_config().vocab_size)
