"""The synthesis driver: a pool of live trajectories advanced round by round, refilled from
the prompts, graded, and written prompt by prompt in prompt order."""

from __future__ import annotations

import logging
import time
from collections import deque
from importlib import metadata
from typing import Any

from tqdm import tqdm

from megatron_dcod.synthesis.config import SynthesisConfig
from megatron_dcod.synthesis.loops import ROUNDS, LanguageModel, Models, start
from megatron_dcod.synthesis.output import SynthesisOutput
from megatron_dcod.synthesis.prompts import Prompt, iter_prompts, prompt_fields
from megatron_dcod.synthesis.trajectory import Trajectory

LOG = logging.getLogger(__name__)
PACKAGES = ("megatron-dcod", "torch", "transformers", "vllm", "math-verify")


def synthesize(config: SynthesisConfig, models: Models | None = None, render=None) -> dict:
    """Run (or resume) synthesis; returns the summary that `{out}.summary.json` holds.
    `models` and `render` (messages -> prompt text) replace the ones the config names."""
    prompts = list(iter_prompts(config, render or make_renderer(config)))  # checked up front
    output = SynthesisOutput(config, {"versions": package_versions()})
    done = output.resume()  # refuses other settings at the same --out before models load
    todo = deque(prompt for prompt in prompts if prompt.index not in done)
    if models is None:
        models, output.run_info["engine"] = load_models(config)
    else:
        output.run_info["engine"] = {"backend": models.teacher.engine.name}
    grader = _grader(config)
    started, generated, finished_trajectories = time.perf_counter(), 0, 0
    live: list[Trajectory] = []
    unwritten: deque[list[Trajectory]] = deque()  # per prompt, in prompt order
    with tqdm(total=len(todo), desc=f"synthesize {config.method}", unit="prompt") as progress:
        while live or todo:
            while todo and (
                not live or len(live) + config.responses_per_prompt <= config.max_live_trajectories
            ):
                trajectories = _start_prompt(todo.popleft(), models, config)
                live += trajectories
                unwritten.append(trajectories)
            ROUNDS[config.method](live, models, config)
            live = [trajectory for trajectory in live if not trajectory.done]
            while unwritten and all(trajectory.done for trajectory in unwritten[0]):
                finished = unwritten.popleft()
                generated += _write_prompt(output, finished, grader, config)
                finished_trajectories += len(finished)
                progress.update(1)
                _show_rates(progress, output, finished_trajectories, generated, started)
    elapsed = time.perf_counter() - started
    rates = {"seconds": round(elapsed, 3), "generated_tokens_this_run": generated}
    rates["tokens_per_s"] = generated / elapsed if elapsed else None
    return output.write_summary(complete=True, extra=rates)


def make_renderer(config: SynthesisConfig):
    """messages -> the prompt text, with the chat template of the student (else the teacher)."""
    from megatron_dcod.data.chat import ChatTokenizer

    if not config.chat_template:
        return None
    chat = ChatTokenizer(config.student or config.teacher)
    return lambda messages: chat.render(messages, add_generation_prompt=True)


def load_models(config: SynthesisConfig) -> tuple[Models, dict]:
    """The engines of the run, and a description of them for the summary."""
    from megatron_dcod.data.chat import load_tokenizer
    from megatron_dcod.inference.engine import choose_backend

    backend = choose_backend(config.backend)
    dtype = config.dtype or ("fp32" if backend == "hf" and config.device == "cpu" else "bf16")

    def model(directory: str, tensor_parallel: int, memory: float | None) -> LanguageModel:
        tokenizer = load_tokenizer(directory)
        if backend == "vllm":
            from megatron_dcod.inference.vllm_engine import VLLMEngine

            engine = VLLMEngine(
                directory, dtype=dtype, tensor_parallel_size=tensor_parallel,
                seed=config.seed, gpu_memory_utilization=memory,
                max_logprobs=max(20, config.entropy_topk),
            )  # fmt: skip
        else:
            from megatron_dcod.inference.hf_engine import HFEngine

            engine = HFEngine(
                directory, tokenizer, device=config.device, dtype=dtype,
                batch_size=config.batch_size, batch_tokens=config.batch_tokens,
            )  # fmt: skip
        return LanguageModel(engine, tokenizer, raw_prompts=not config.chat_template)

    teacher = model(
        config.teacher, config.teacher_tensor_parallel_size, config.teacher_gpu_memory_utilization
    )
    student = None
    if config.student:
        student = model(
            config.student,
            config.student_tensor_parallel_size,
            config.student_gpu_memory_utilization,
        )
    engine = {"backend": backend, "dtype": dtype}
    engine["device"] = config.device if backend == "hf" else "cuda"
    return Models(teacher, student), engine


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _start_prompt(prompt: Prompt, models: Models, config: SynthesisConfig) -> list[Trajectory]:
    trajectories = [Trajectory(prompt, r) for r in range(config.responses_per_prompt)]
    for trajectory in trajectories:
        start(trajectory, models)
    return trajectories


def _grader(config: SynthesisConfig):
    if not config.answer_field:
        return None
    from megatron_dcod.eval.grading import Grader

    return Grader()


def _write_prompt(output: SynthesisOutput, finished: list[Trajectory], grader, config) -> int:
    """Grade, filter and append one prompt's trajectories; the tokens they generated."""
    records, counts = [], dict.fromkeys(("trajectories", "kept", "failed", "breaches"), 0)
    counts |= dict.fromkeys(("graded", "correct", "t_star_sum", "steps", "value_sum"), 0)
    counts["failed_scores"] = 0
    generated = 0
    for trajectory in finished:
        counts["trajectories"] += 1
        for source, tokens in trajectory.tokens_by_source().items():
            counts[f"tokens_{source}"] = counts.get(f"tokens_{source}", 0) + tokens
            generated += tokens
        values = [step.value for step in trajectory.steps if step.value is not None]
        counts["steps"] += len(values)
        counts["value_sum"] += sum(values)
        counts["failed_scores"] += sum(step.score_error is not None for step in trajectory.steps)
        fields = trajectory.record_fields(config.method, config.revise_text)
        if trajectory.error is not None or not fields["response"]:
            counts["failed"] += 1
            reason = trajectory.error or "empty response"
            LOG.warning("%s response %d failed: %s", trajectory.prompt.location,
                        trajectory.response_index, reason)  # fmt: skip
            continue
        counts["breaches"] += trajectory.breach
        counts["t_star_sum"] += trajectory.t_star or 0
        if grader is not None:
            grade = grader.grade(fields["response"], trajectory.prompt.gold)
            fields["grade"] = {
                "correct": grade.correct,
                "extracted": grade.extracted,
                "reason": grade.reason,
            }
            counts["graded"] += 1
            counts["correct"] += grade.correct
            if config.keep == "correct" and not grade.correct:
                continue
        records.append(prompt_fields(trajectory.prompt, fields["response"], fields))
        counts["kept"] += 1
    output.add_prompt(finished[0].prompt.index, records, counts)
    return generated


def _show_rates(progress, output, trajectories: int, generated: int, started: float) -> None:
    """Trajectories/s and tokens/s of this run; the breach rate of the whole output."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    totals = output.totals
    breach_rate = totals["breaches"] / max(totals["trajectories"], 1)
    progress.set_postfix(
        traj_s=f"{trajectories / elapsed:.2f}", tok_s=f"{generated / elapsed:.1f}",
        breach=f"{breach_rate:.0%}", failed=totals["failed"],
    )  # fmt: skip
