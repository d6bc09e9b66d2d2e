"""Generation backends: vLLM when it is installed and a GPU is present, else HF transformers.

Both take prompts already rendered with the checkpoint's chat template and tokenized, and
return, per prompt, the response text, its token ids and whether max new tokens cut it off.
A prompt that cannot be generated (too long for the model's context, or a failure that
repeats when the prompt is run alone) comes back with `error` set instead of raising, so that
the run goes on and the item is graded wrong with the reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch
from transformers import GenerationConfig

from megatron_dcod.scoring.hf_scorer import load_causal_lm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Set explicitly because transformers fills unset values from the model's generation_config and
# then from its global defaults (top_k=50): decoding is plain greedy or temperature + top-p.
PLAIN_DECODING = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
PLAIN_SAMPLING = dict(top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings of one run."""

    temperature: float
    """0: greedy."""
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass
class Generation:
    """One response."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, the stop token excluded."""
    truncated: bool = False
    """Stopped by max new tokens (or the model's context) rather than a stop token."""
    error: str | None = None
    """Why nothing was generated (the item is then graded wrong with this reason)."""


class Backend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingConfig, seeds: Sequence[int]
    ) -> list[Generation]:
        """One response per prompt; seeds[i] seeds prompt i where the backend can."""


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


class HFBackend:
    """Batched `model.generate` with left padding and the KV cache, on CPU or GPU."""

    name = "hf"

    def __init__(
        self, model_dir: str | Path, tokenizer, *, device: str, dtype: str, batch_size: int
    ):
        self.model = load_causal_lm(model_dir, DTYPES[dtype]).to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        pad_id = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
        self.stop_ids = stop_token_ids(self.model.generation_config, tokenizer)
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or 2**31

    def generate(self, prompts, sampling, seeds):
        results: list[Generation | None] = [None] * len(prompts)
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.context:
                message = f"prompt of {len(prompt)} tokens fills the model's context"
                results[i] = Generation("", error=f"{message} ({self.context})")
        order = sorted(
            (i for i, r in enumerate(results) if r is None), key=lambda i: -len(prompts[i])
        )
        for start in range(0, len(order), self.batch_size):  # sorted: similar lengths together
            batch = order[start : start + self.batch_size]
            generations = self._generate_or_split(prompts, batch, sampling, seeds)
            for index, generation in zip(batch, generations):
                results[index] = generation
        return results

    def _generate_or_split(self, prompts, batch, sampling, seeds) -> list[Generation]:
        """The batch at once; after a failure each prompt alone, so only failing ones fail."""
        try:
            return self._generate_batch(prompts, batch, sampling, seeds)
        except Exception as error:  # OOM, NaN logits, ...: retry alone to isolate the culprit
            if len(batch) == 1:
                return [Generation("", error=f"generation failed: {error!r}"[:500])]
            return [self._generate_or_split(prompts, [i], sampling, seeds)[0] for i in batch]

    @torch.inference_mode()
    def _generate_batch(self, prompts, batch, sampling, seeds) -> list[Generation]:
        longest = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)  # [b, s]
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):  # left padding
            input_ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, longest - len(prompts[i]) :] = 1
        max_new_tokens = min(sampling.max_new_tokens, self.context - longest)
        torch.manual_seed(seeds[batch[0]])  # one stream per batch: HF cannot seed rows apart
        greedy = sampling.temperature == 0
        sampler = dict(temperature=sampling.temperature, top_p=sampling.top_p, **PLAIN_SAMPLING)
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            **PLAIN_DECODING,
            **({} if greedy else sampler),
        )
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=settings,
        )[
            :, longest:
        ].cpu()  # [b, new]
        return [self._response(row.tolist(), max_new_tokens) for row in sequences]

    def _response(self, new_ids: list[int], max_new_tokens: int) -> Generation:
        stop = next((j for j, token in enumerate(new_ids) if token in self.stop_ids), None)
        ids = new_ids if stop is None else new_ids[:stop]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text, ids, truncated=stop is None and len(new_ids) >= max_new_tokens)


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """The model's EOS ids (generation config, which may list several) and the tokenizer's."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token: generation could never stop")
    return ids


class VLLMBackend:
    """vLLM offline inference (continuous batching, paged KV cache) on GPUs."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, dtype: str, tensor_parallel_size: int, seed: int):
        from vllm import LLM

        dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtypes[dtype],
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            generation_config="vllm",  # no sampling defaults inherited from the model
        )

    def generate(self, prompts, sampling, seeds):
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                top_k=-1,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
            )
            for seed in seeds
        ]
        inputs = [{"prompt_token_ids": list(ids)} for ids in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [_vllm_generation(output) for output in outputs]


def _vllm_generation(output) -> Generation:
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and completion.stop_reason is None and ids:
        ids = ids[:-1]  # stopped by EOS, which vLLM keeps in the ids (not in the text)
    return Generation(completion.text, ids, truncated=completion.finish_reason == "length")
