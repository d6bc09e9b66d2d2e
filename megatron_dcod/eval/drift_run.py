"""tools/measure_drift.py: sample from both models, score every step with both, write ExAccErr.

run_config.json     what defines the run (models, data, prompt, sampling)
generations.jsonl   per prompt: the per-step KL(p ‖ q_θ) of each sampled response, along
                    the student's samples (`student_prefix`) and the teacher's
                    (`teacher_prefix`); appended after each batch of prompts, so a rerun
                    resumes where the last one stopped
summary.json        R(l), ε(l), ExAccErr(l) for l = 1..max_new_tokens, and at the
                    reported lengths (written at the end)
report.md           the reported lengths as a table
drift.png           ExAccErr(l), R(l) and ε(l)
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_dcod.config import DriftConfig
from megatron_dcod.data.chat import ChatTokenizer
from megatron_dcod.eval.benchmarks import Problem, get_benchmark, load_problems, with_fields
from megatron_dcod.eval.drift import DriftCurves, divergences_along, drift_curves
from megatron_dcod.eval.evaluate import prompt_ids
from megatron_dcod.eval.outputs import RunDir
from megatron_dcod.inference.engine import SamplingConfig
from megatron_dcod.inference.hf_engine import HFEngine

ARMS = ("student_prefix", "teacher_prefix")
"""Whose samples the prefixes are: the student's (R, eq. 30) or the teacher's (ε, eq. 31)."""


def measure_drift(config: DriftConfig) -> dict:
    """Run (or resume) the measurement; returns the summary also written to summary.json."""
    chat = ChatTokenizer(config.student)
    _check_same_vocabulary(chat, ChatTokenizer(config.teacher), config)
    benchmark = with_fields(get_benchmark(config.benchmark), config.problem_field, None)
    benchmark = replace(benchmark, gold=lambda record: "")  # prompts only: no answer needed
    problems = load_problems(benchmark, config.data, config.split, config.num_prompts)
    run = RunDir(config.out, _identity(config))
    try:
        _check_same_problems(run, problems, config)
        todo = [problem for problem in problems if not run.done(problem.index, 0)]
        if todo:
            _sample_and_score(config, chat, run, todo)
    finally:
        run.close()
    records = [run.completed[(problem.index, 0)] for problem in problems]
    curves = drift_curves(
        [[np.asarray(d) for d in record["student_prefix"]] for record in records],
        [[np.asarray(d) for d in record["teacher_prefix"]] for record in records],
        config.max_new_tokens,
    )
    summary = _summary(config, curves, len(records))
    run.write_summary(summary, _report(summary))
    _plot(curves, summary, Path(config.out) / "drift.png")
    return summary


def _sample_and_score(config: DriftConfig, chat: ChatTokenizer, run: RunDir, todo) -> None:
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engines = {
        role: HFEngine(path, chat.tokenizer, device=device, dtype=config.dtype,
                       batch_size=config.batch_size * config.samples)
        for role, path in (("student", config.student), ("teacher", config.teacher))
    }  # fmt: skip
    sampling = SamplingConfig(config.temperature, config.top_p, config.max_new_tokens, config.seed)
    vocab_size = len(chat.tokenizer)
    started, tokens = time.monotonic(), 0
    progress = tqdm(total=len(todo), desc="drift", unit="prompt")
    for first in range(0, len(todo), config.batch_size):
        batch = todo[first : first + config.batch_size]
        prompts = [prompt_ids(chat, config.prompt_template, config.system_prompt, p) for p in batch]
        record = {
            p.index: {"problem_index": p.index, "sample": 0, "problem": p.text} for p in batch
        }
        for arm, sampler in zip(ARMS, ("student", "teacher")):
            responses = _sample(engines[sampler], prompts, batch, sampling, config, arm)
            tokens += sum(len(r) for group in responses for r in group)
            divergences = divergences_along(
                engines["teacher"].model, engines["student"].model, prompts, responses,
                vocab_size, config.batch_tokens,
            )  # fmt: skip
            for problem, per_response in zip(batch, divergences):
                record[problem.index][arm] = [d.round(7).tolist() for d in per_response]
        run.append(list(record.values()))
        progress.update(len(batch))
    progress.close()
    elapsed = time.monotonic() - started
    print(f"drift: sampled and scored {tokens} tokens in {elapsed:.1f} s")


def _sample(engine: HFEngine, prompts, problems: list[Problem], sampling, config, arm: str):
    """`config.samples` responses per prompt from `engine`, each with its own seed; a response
    that ended with EOS keeps the EOS token (its distribution is a step too)."""
    contexts = [prompt for prompt in prompts for _ in range(config.samples)]
    seeds = [
        _seed(config.seed, arm, problem.index, sample)
        for problem in problems
        for sample in range(config.samples)
    ]
    generations = engine.generate(contexts, sampling, seeds)
    eos = engine.tokenizer.eos_token_id
    eos = eos if eos in engine.stop_ids else min(engine.stop_ids)
    responses = []
    for i, generation in enumerate(generations):
        if generation.error is not None:
            raise ValueError(f"{problems[i // config.samples].location}: {generation.error}")
        ids = list(generation.token_ids) + ([eos] if generation.finish_reason == "eos" else [])
        responses.append(ids)
    return [responses[i : i + config.samples] for i in range(0, len(responses), config.samples)]


def _check_same_problems(run: RunDir, problems: list[Problem], config: DriftConfig) -> None:
    """The prompts an earlier attempt measured are the ones the data holds now."""
    for problem in problems:
        record = run.completed.get((problem.index, 0))
        if record is not None and record.get("problem") != problem.text:
            raise ValueError(
                f"{config.out} holds problem {problem.index} as {record.get('problem')!r}, "
                f"but {problem.location} is {problem.text!r}: the data changed; use another --out"
            )


def _seed(seed: int, arm: str, problem_index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}/{arm}/{problem_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _check_same_vocabulary(student: ChatTokenizer, teacher: ChatTokenizer, config) -> None:
    if student.fingerprint.vocab_sha256 != teacher.fingerprint.vocab_sha256:
        raise ValueError(
            f"{config.student} and {config.teacher} have different vocabularies: the per-step "
            "divergence compares the two models' distributions over the same token ids"
        )


def _identity(config: DriftConfig) -> dict:
    identity = asdict(config)
    for field in ("out", "device", "batch_size", "batch_tokens", "report_lengths", "num_prompts"):
        identity.pop(field)
    return {
        key: str(value) if isinstance(value, Path) else value for key, value in identity.items()
    }


def reported_lengths(config: DriftConfig) -> list[int]:
    """The lengths the summary reports: config.report_lengths, else powers of two and the
    longest."""
    longest = config.max_new_tokens
    lengths = config.report_lengths or [2**i for i in range(3, 16) if 2**i < longest]
    return sorted({*(length for length in lengths if 1 <= length <= longest), longest})


def _summary(config: DriftConfig, curves: DriftCurves, prompt_count: int) -> dict:
    def values(array) -> list:
        return [None if math.isnan(v) else round(float(v), 6) for v in array]

    exacc = curves.exacc_err
    at = {
        str(length): {
            name: values(array[length - 1 : length])[0]
            for name, array in (
                ("exacc_err", exacc),
                ("student_prefix_error", curves.student_prefix_error),
                ("teacher_prefix_error", curves.teacher_prefix_error),
                ("student_live", curves.student_live),
                ("teacher_live", curves.teacher_live),
            )
        }
        for length in reported_lengths(config)
    }
    return {
        "student": str(config.student),
        "teacher": str(config.teacher),
        "data": config.data,
        "prompts": prompt_count,
        "samples_per_prompt": config.samples,
        "settings": {k: v for k, v in _identity(config).items() if k not in ("student", "teacher")},
        "at": at,
        "curves": {
            "length": list(range(1, config.max_new_tokens + 1)),
            "exacc_err": values(exacc),
            "student_prefix_error": values(curves.student_prefix_error),
            "teacher_prefix_error": values(curves.teacher_prefix_error),
            "student_prefix_std": values(curves.student_prefix_std),
            "teacher_prefix_std": values(curves.teacher_prefix_std),
            "student_live": values(curves.student_live),
            "teacher_live": values(curves.teacher_live),
        },
    }


def _report(summary: dict) -> str:
    rows = [
        "| l | ExAccErr(l) % | R(l) student prefixes | ε(l) teacher prefixes | "
        "live (student, teacher) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for length, point in summary["at"].items():
        exacc = "n/a" if point["exacc_err"] is None else f"{point['exacc_err']:.1f}"
        rows.append(
            f"| {length} | {exacc} | {point['student_prefix_error']:.4f} | "
            f"{point['teacher_prefix_error']:.4f} | "
            f"{point['student_live']:.0%}, {point['teacher_live']:.0%} |"
        )
    header = (
        f"ExAccErr of {summary['student']} against {summary['teacher']}: "
        f"{summary['prompts']} prompts × {summary['samples_per_prompt']} samples per model "
        "(MiniLLM, arXiv 2306.08543, appendix B.5, eqs. 30–32)\n\n"
    )
    return header + "\n".join(rows) + "\n"


def _plot(curves: DriftCurves, summary: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.arange(1, len(curves.exacc_err) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(lengths, curves.exacc_err, color="C3")
    left.axhline(0, color="grey", linewidth=0.8)
    left.set(xlabel="generation length l", ylabel="ExAccErr(l) (%)", title="excess error")
    right.plot(lengths, curves.student_prefix_error, label="R(l): student prefixes")
    right.plot(lengths, curves.teacher_prefix_error, label="ε(l): teacher prefixes")
    right.set(xlabel="generation length l", ylabel="accumulated KL(p ‖ q)", title="accumulated")
    right.legend()
    figure.suptitle(f"{Path(summary['student']).name} vs {Path(summary['teacher']).name}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
