"""The vLLM engine: offline in-process `LLM` (continuous batching, paged KV cache) on GPUs.

Generation passes stop strings with `include_stop_str_in_output=True` (the text keeps them) and
one seed per request. Scoring asks for the prompt's own log-probs (`prompt_logprobs`) on
context + continuation and for the top-k of one further token (`logprobs=k`, `max_tokens=1`) at
temperature 1 with no top-p/top-k, so both are the model's raw distribution. Prefix caching is
on: the step loops resend the same growing contexts every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_dcod.inference.engine import Generation, SamplingConfig, Score
from megatron_dcod.inference.engine import context_check, failed_generation, failed_score
from megatron_dcod.inference.engine import run_isolated

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
RAW_ONE_TOKEN = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=1)
"""Scoring requests: one generated token from the model's unmodified distribution."""


class VLLMEngine:
    """Generate and score with vLLM; `tensor_parallel_size` GPUs per model."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        enable_prefix_caching: bool = True,
        max_logprobs: int = 20,
    ):
        from vllm import LLM

        memory = (
            {}
            if gpu_memory_utilization is None
            else {"gpu_memory_utilization": gpu_memory_utilization}
        )
        self.llm = LLM(
            model=str(model_dir),
            dtype=VLLM_DTYPES[dtype],
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            generation_config="vllm",  # no sampling defaults inherited from the model
            enable_prefix_caching=enable_prefix_caching,
            max_logprobs=max_logprobs,
            **memory,
        )
        self.max_logprobs = max_logprobs
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.context = getattr(config, "max_model_len", None) or 2**31
        self.stop_token_ids = _model_eos_ids(model_dir)
        """EOS ids of the model's generation config, which `generation_config="vllm"` drops."""

    def generate(
        self,
        contexts: Sequence[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        from vllm import SamplingParams

        limits = max_new_tokens or [sampling.max_new_tokens] * len(contexts)
        stop = (
            dict(stop=list(sampling.stop), include_stop_str_in_output=True) if sampling.stop else {}
        )
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                top_k=-1,
                max_tokens=limit,
                seed=seed,
                stop_token_ids=self.stop_token_ids,
                **stop,
            )
            for seed, limit in zip(seeds, limits)
        ]

        def run(batch: list[int]) -> list[Generation]:
            outputs = self._run([contexts[i] for i in batch], [params[i] for i in batch])
            return [_generation(output) for output in outputs]

        return run_isolated(
            [list(range(len(contexts)))],
            len(contexts),
            context_check(contexts, self.context),
            run,
            failed_generation,
        )

    def score(self, requests: Sequence[tuple[list[int], list[int]]], topk: int) -> list[Score]:
        from vllm import SamplingParams

        if topk > self.max_logprobs:
            raise ValueError(
                f"top-{topk} exceeds this vLLM engine's max_logprobs={self.max_logprobs}"
            )
        params = SamplingParams(
            **RAW_ONE_TOKEN,
            prompt_logprobs=1,  # the actual token's entry is always there, in the top-1 or not
            logprobs=max(topk, 1),
        )

        def run(batch: list[int]) -> list[Score]:
            sequences = [requests[i][0] + requests[i][1] for i in batch]
            outputs = self._run(sequences, [params] * len(batch))
            return [
                _score(output, sequence, len(requests[i][0]), topk)
                for output, sequence, i in zip(outputs, sequences, batch)
            ]

        def invalid(i: int) -> str | None:
            total = len(requests[i][0]) + len(requests[i][1]) + 1  # + the next token
            if not requests[i][0]:
                return "empty context: the first continuation token has nothing to condition on"
            return (
                f"{total} tokens exceed the model's context ({self.context})"
                if total > self.context
                else None
            )

        return run_isolated([list(range(len(requests)))], len(requests), invalid, run, failed_score)

    def _run(self, sequences: Sequence[list[int]], params) -> list:
        inputs = [{"prompt_token_ids": list(ids)} for ids in sequences]
        return self.llm.generate(inputs, params, use_tqdm=False)


def _model_eos_ids(model_dir: str | Path) -> list[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS only
        return []
    return sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos]))


def _generation(output) -> Generation:
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    if completion.finish_reason == "length":
        return Generation(completion.text, ids, "length")
    if isinstance(completion.stop_reason, str):  # a stop string, kept in the text
        return Generation(completion.text, ids, "stop")
    if ids:
        ids = ids[:-1]  # stopped by EOS, which vLLM keeps in the ids (not in the text)
    return Generation(completion.text, ids, "eos")


def _score(output, sequence: list[int], context_length: int, topk: int) -> Score:
    """Read one RequestOutput with the reader of vLLM records (data/engine_records.py): the
    continuation's prompt log-probs, and the top-k of the one token generated after it."""
    from megatron_dcod.data.engine_records import EngineOutputError, vllm_prompt_logprobs

    try:
        logprobs, _, _ = vllm_prompt_logprobs(np.asarray(sequence), output.prompt_logprobs, 0)
        continuation = logprobs[context_length:]  # [continuation tokens]
        if np.isnan(continuation).any():
            raise EngineOutputError("a continuation token has no log-prob")
        score = Score(continuation.tolist())
        if topk:
            completion = output.outputs[0]
            sampled = np.asarray(completion.token_ids[:1])  # the entries hold it and the top-k
            _, ids, values = vllm_prompt_logprobs(sampled, completion.logprobs[:1], topk)
            score.next_topk_ids, score.next_topk_logprobs = ids[0].tolist(), values[0].tolist()
    except EngineOutputError as error:
        return Score(error=f"vLLM's log-probs: {error}")
    return score
