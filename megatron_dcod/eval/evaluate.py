"""tools/eval_math.py: generate, grade and summarize one benchmark for one HF checkpoint."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dcod.config import EvalConfig
from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.eval.benchmarks import (
    Benchmark,
    Problem,
    get_benchmark,
    load_problems,
    with_fields,
)
from megatron_dcod.eval.grading import Grader, grader_version
from megatron_dcod.eval.metrics import has_repetition_loop, summarize
from megatron_dcod.inference.engine import Generation, SamplingConfig, choose_backend
from megatron_dcod.inference.hf_engine import HFEngine
from megatron_dcod.inference.vllm_engine import VLLMEngine
from megatron_dcod.eval.outputs import RunDir, markdown_report

Item = tuple[Problem, int]  # a problem and the index of one of its k samples


def evaluate(config: EvalConfig) -> dict:
    """Run (or resume) the evaluation; returns the summary also written to `config.out`."""
    benchmark = _benchmark(config)
    problems = load_problems(benchmark, config.data, config.split, config.limit)
    config = _resolved(config, benchmark)
    sampling = SamplingConfig(config.temperature, config.top_p, config.max_new_tokens, config.seed)
    chat = ChatTokenizer(config.model)
    run = RunDir(config.out, _identity(config))
    try:
        todo = _pending(run, problems, config.samples)
        grader = Grader(config.grading_timeout)
        if todo:
            backend = _make_backend(config, chat.tokenizer)
            throughput = _generate_and_grade(config, chat, backend, grader, run, todo, sampling)
        else:
            throughput = {}
    finally:
        run.close()
    records = [run.completed[(p.index, s)] for p in problems for s in range(config.samples)]
    summary = {
        "benchmark": config.benchmark,
        "model": str(config.model),
        "backend": config.backend,
        "grader": grader_version(),
        "settings": _settings(config),
        **summarize(records, config.samples),
        "throughput": throughput,
    }
    run.write_summary(summary, markdown_report(summary))
    return summary


def gold_vs_gold(config: EvalConfig) -> tuple[int, list[str]]:
    """Grade every gold answer, boxed, as the response: (problems, failure descriptions)."""
    problems = load_problems(_benchmark(config), config.data, config.split, config.limit)
    grader = Grader(config.grading_timeout)
    failures = []
    for problem in tqdm(problems, desc="gold vs gold", unit="problem"):
        grade = grader.grade(f"The final answer is $\\boxed{{{problem.gold}}}$.", problem.gold)
        if not grade.correct:
            failures.append(f"{problem.location}: gold {problem.gold!r}: {grade.reason}")
    return len(problems), failures


def _benchmark(config: EvalConfig) -> Benchmark:
    return with_fields(get_benchmark(config.benchmark), config.problem_field, config.answer_field)


def _resolved(config: EvalConfig, benchmark: Benchmark) -> EvalConfig:
    """Benchmark defaults for unset sampling fields, device and dtype for the backend."""
    if config.model is None:
        raise ValueError("--model is required")
    if "{problem}" not in config.prompt_template:
        raise ValueError("--prompt-template must contain {problem}")
    defaults = benchmark.sampling
    backend = choose_backend(config.backend)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = replace(
        config,
        model=Path(config.model).resolve(),
        temperature=defaults.temperature if config.temperature is None else config.temperature,
        top_p=defaults.top_p if config.top_p is None else config.top_p,
        max_new_tokens=config.max_new_tokens or defaults.max_new_tokens,
        samples=config.samples or defaults.samples,
        backend=backend,
        device=device,
        dtype=config.dtype or ("fp32" if device == "cpu" else "bf16"),
        batch_size=config.batch_size or (16 if backend == "hf" else 1024),
    )
    if config.samples > 1 and config.temperature == 0:
        raise ValueError(f"{config.samples} samples per problem need --temperature > 0")
    return config


def _identity(config: EvalConfig) -> dict:
    """What a resumed run must share with the results already in its --out (not k: more
    samples may be added later, nor the batch size or the device)."""
    keep = ("model", "benchmark", "data", "split", "problem_field", "answer_field")
    keep += ("system_prompt", "prompt_template", "temperature", "top_p", "max_new_tokens")
    keep += ("seed", "backend", "dtype")
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(config).items() if key in keep}  # fmt: skip


def _settings(config: EvalConfig) -> dict:
    return {**_identity(config), "samples": config.samples, "batch_size": config.batch_size}


def _pending(run: RunDir, problems: list[Problem], samples: int) -> list[Item]:
    """Items not generated yet; a completed item must belong to the same problem."""
    todo = []
    for problem in problems:
        for sample in range(samples):
            record = run.completed.get((problem.index, sample))
            if record is None:
                todo.append((problem, sample))
            elif record["problem"] != problem.text or record["gold"] != problem.gold:
                raise ValueError(
                    f"{run.out}: problem {problem.index} of the earlier run differs from "
                    f"{problem.location}; the data changed, use another --out"
                )
    return todo


def _make_backend(config: EvalConfig, tokenizer):
    if config.backend == "vllm":
        return VLLMEngine(
            config.model,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
        )
    return HFEngine(
        config.model, tokenizer, device=config.device, dtype=config.dtype,
        batch_size=config.batch_size,
    )  # fmt: skip


def _generate_and_grade(config, chat, backend, grader, run, todo, sampling) -> dict:
    """Generate in chunks of --batch-size, grade each chunk and append it to the log."""
    problems_left = {problem.index for problem, _ in todo}
    started, tokens = time.perf_counter(), 0
    with tqdm(total=len(problems_left), desc=config.benchmark, unit="problem") as progress:
        for start in range(0, len(todo), config.batch_size):
            chunk = todo[start : start + config.batch_size]
            prompts = [
                prompt_ids(chat, config.prompt_template, config.system_prompt, problem)
                for problem, _ in chunk
            ]
            seeds = [_item_seed(config.seed, problem.index, sample) for problem, sample in chunk]
            generations = backend.generate(prompts, sampling, seeds)
            run.append([_graded(grader, item, gen) for item, gen in zip(chunk, generations)])
            tokens += sum(len(generation.token_ids) for generation in generations)
            finished = {p.index for p, _ in chunk if _all_done(run, p, config.samples)}
            progress.update(len(finished & problems_left))
            problems_left -= finished
            elapsed = time.perf_counter() - started
            progress.set_postfix(tok_s=f"{tokens / elapsed:.1f}")
    elapsed = time.perf_counter() - started
    return {
        "generated_tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": tokens / elapsed,
        "problems_per_s": len({problem.index for problem, _ in todo}) / elapsed,
    }


def _all_done(run: RunDir, problem: Problem, samples: int) -> bool:
    return all(run.done(problem.index, sample) for sample in range(samples))


def prompt_ids(
    chat: ChatTokenizer, prompt_template: str, system_prompt: str | None, problem: Problem
) -> list[int]:
    """The chat-templated prompt, ending with the generation prompt of the assistant turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt_template.format(problem=problem.text)})
    text = chat.render(messages, add_generation_prompt=True)
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"]


def _item_seed(seed: int, problem_index: int, sample: int) -> int:
    """A seed per (problem, sample), independent of batching (used where the backend can)."""
    digest = hashlib.sha256(f"{seed}/{problem_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _graded(grader: Grader, item: Item, generation: Generation) -> dict:
    problem, sample = item
    if generation.error is not None:
        correct, extracted, reason = False, None, generation.error
    else:
        grade = grader.grade(generation.text, problem.gold)
        correct, extracted, reason = grade.correct, grade.extracted, grade.reason
    return {
        "problem_index": problem.index,
        "sample": sample,
        "id": problem.source_id,
        "problem": problem.text,
        "gold": problem.gold,
        "response": generation.text,
        "extracted": extracted,
        "correct": correct,
        "reason": reason,
        "num_tokens": len(generation.token_ids),
        "truncated": generation.truncated,
        "repetition": has_repetition_loop(generation.token_ids),
    }
