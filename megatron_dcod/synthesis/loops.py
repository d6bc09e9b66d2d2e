"""The step-synchronous loops: every live trajectory advances one step per round.

A round is one batched student generate, one batched teacher score (V_T of the new steps and
H at the contexts after them), and the batched teacher generations the round needs (MOTAB's
continuations after a breach, SKD's rewrites). Trajectories that finish leave the batch; the
driver (`synthesis.run`) refills it. Every generation draws from a seed of its own trajectory
and round, so a batched run equals a one-trajectory-at-a-time run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from megatron_dcod.inference.engine import Engine, Generation, SamplingConfig
from megatron_dcod.synthesis import monitor
from megatron_dcod.synthesis.config import SynthesisConfig
from megatron_dcod.synthesis.trajectory import Step, Trajectory


@dataclass
class LanguageModel:
    """An engine and the tokenizer its contexts are written in."""

    engine: Engine
    """Generates and scores token-id contexts."""
    tokenizer: object
    """The model's HF tokenizer (contexts are kept in its tokens)."""
    raw_prompts: bool = False
    """Prompts are raw text: tokenize them with the tokenizer's special tokens (BOS)."""

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.raw_prompts)["input_ids"]

    def encode(self, text: str) -> list[int]:
        """Continuation text (a step) in this model's tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass
class Models:
    """The models of a run."""

    teacher: LanguageModel
    """Scores steps, writes continuations (MOTAB) and rewrites (SKD), or every answer."""
    student: LanguageModel | None = None
    """Proposes the steps (motab, skd)."""


def start(trajectory: Trajectory, models: Models) -> None:
    """Tokenize the prompt for each model."""
    trajectory.teacher_ids = models.teacher.encode_prompt(trajectory.prompt.text)
    if models.student is not None:
        trajectory.student_ids = models.student.encode_prompt(trajectory.prompt.text)


def teacher_round(live: list[Trajectory], models: Models, config: SynthesisConfig) -> None:
    """Teacher mode: the teacher writes each whole response in one generation."""
    sampling = _sampling(config, config.max_tokens, stop=())
    seeds = [t.seed(config.seed, "teacher") for t in live]
    generations = models.teacher.engine.generate([t.teacher_ids for t in live], sampling, seeds)
    for trajectory, generation in zip(live, generations):
        trajectory.done = True
        if generation.error is not None or not generation.text.strip():
            trajectory.error = generation.error or "the teacher returned an empty response"
        else:
            trajectory.continuation = generation.text
            trajectory.continuation_tokens = len(generation.token_ids)


def motab_round(live: list[Trajectory], models: Models, config: SynthesisConfig) -> None:
    """MOTAB (docs/synthesis.md): one monitored student step for every live trajectory.

    Breached trajectories wait for their teacher continuation until they fill half of
    --max-live-trajectories (or nothing else is stepping), so that continuations, the longest
    generations, share batches."""
    waiting = [t for t in live if t.breach]
    active = [t for t in live if not t.breach]
    _look_up_first_entropy([t for t in active if t.entropy is None], models, config)
    proposals = _propose_steps(active, models.student, config)
    stepping = [(t, g) for t, g in zip(active, proposals) if not _end_if_no_step(t, g)]
    requests = [(t.teacher_ids, models.teacher.encode(g.text)) for t, g in stepping]
    scores = models.teacher.engine.score(requests, topk=config.entropy_topk)
    breached = []
    for (trajectory, generation), score, (_, step_ids) in zip(stepping, scores, requests):
        value = monitor.scored_value(score)
        boundary = monitor.breach_boundary(trajectory.entropy, config.epsilon0, config.theta)
        step = Step(
            generation.text, "student", len(generation.token_ids), generation.finish_reason,
            value, boundary, trajectory.entropy, accepted=not monitor.is_breach(value, boundary),
            score_error=score.error,
        )  # fmt: skip
        _record_step(trajectory, step, models, step_ids, extend=step.accepted)
        if not step.accepted:
            breached.append(trajectory)
            continue
        trajectory.entropy = monitor.scored_entropy(score)
        _finish_if_ended(trajectory, step, config)
    for trajectory in breached:
        values = [step.value for step in trajectory.steps]
        boundaries = [step.boundary for step in trajectory.steps]
        trajectory.breach, trajectory.t_star = True, monitor.root_cause_step(values, boundaries)
    waiting += breached
    still_stepping = sum(not t.done and not t.breach for t in live)
    if waiting and (2 * len(waiting) >= config.max_live_trajectories or not still_stepping):
        _continue_with_teacher(waiting, models, config)


def skd_round(live: list[Trajectory], models: Models, config: SynthesisConfig) -> None:
    """SKD: the student proposes a step; the teacher keeps it (V_T > γ·V_S) or rewrites it."""
    proposals = _propose_steps(live, models.student, config)
    stepping = [(t, g) for t, g in zip(live, proposals) if not _end_if_no_step(t, g)]
    teacher_scores = models.teacher.engine.score(
        [(t.teacher_ids, models.teacher.encode(g.text)) for t, g in stepping], topk=0
    )
    student_scores = models.student.engine.score(
        [(t.student_ids, models.student.encode(g.text)) for t, g in stepping], topk=0
    )
    steps = []
    for (trajectory, generation), teacher, student in zip(stepping, teacher_scores, student_scores):
        teacher_value, student_value = monitor.step_value(teacher), monitor.step_value(student)
        accepted = monitor.skd_accepts(teacher_value, student_value, config.gamma)
        steps.append(
            Step(
                generation.text, "student", len(generation.token_ids), generation.finish_reason,
                teacher_value, None, None, student_value, accepted,
                score_error=teacher.error or student.error,
            )  # fmt: skip
        )
    rejected = [(t, s) for (t, _), s in zip(stepping, steps) if not s.accepted]
    rewrites = _teacher_steps([t for t, _ in rejected], models.teacher, config)
    for (trajectory, step), rewrite in zip(rejected, rewrites):
        if rewrite.error is None and rewrite.text:
            step.text, step.source = rewrite.text, "teacher"
            step.tokens, step.finish_reason = len(rewrite.token_ids), rewrite.finish_reason
        else:  # the student's step stays, labelled as the student's
            trajectory.teacher_failed = rewrite.error or "the teacher returned an empty step"
    for (trajectory, _), step in zip(stepping, steps):
        _record_step(trajectory, step, models, None, extend=True)
        _finish_if_ended(trajectory, step, config)


ROUNDS: dict[str, Callable[[list[Trajectory], Models, SynthesisConfig], None]] = {
    "teacher": teacher_round,
    "motab": motab_round,
    "skd": skd_round,
}


def _sampling(config: SynthesisConfig, max_new_tokens: int, stop: tuple[str, ...]):
    return SamplingConfig(config.temperature, config.top_p, max_new_tokens, config.seed, stop)


def _look_up_first_entropy(fresh: list[Trajectory], models: Models, config) -> None:
    """H at the prompt, for the boundary of step 0 (later H come with each step's score)."""
    if fresh:
        scores = models.teacher.engine.score(
            [(t.teacher_ids, []) for t in fresh], config.entropy_topk
        )
        for trajectory, score in zip(fresh, scores):
            trajectory.entropy = monitor.scored_entropy(score)


def _propose_steps(live: list[Trajectory], model: LanguageModel, config) -> list[Generation]:
    """One student step per trajectory, capped by what is left of its token budget."""
    limits = [min(config.max_step_tokens, config.max_tokens - t.used_tokens) for t in live]
    seeds = [t.seed(config.seed, "student") for t in live]
    return _generate_by_limit(model, [t.student_ids for t in live], limits, seeds, config)


def _teacher_steps(rejected: list[Trajectory], model: LanguageModel, config) -> list[Generation]:
    limits = [min(config.max_step_tokens, config.max_tokens - t.used_tokens) for t in rejected]
    seeds = [t.seed(config.seed, "teacher-step") for t in rejected]
    return _generate_by_limit(model, [t.teacher_ids for t in rejected], limits, seeds, config)


def _generate_by_limit(model, contexts, limits, seeds, config, stop=None) -> list[Generation]:
    """One batched generation, each context with its own max-new-tokens limit."""
    stop = config.step_stop if stop is None else stop
    sampling = _sampling(config, max(limits, default=1), stop)
    return model.engine.generate(contexts, sampling, seeds, max_new_tokens=limits)


def _end_if_no_step(trajectory: Trajectory, generation: Generation) -> bool:
    """A failed or empty proposal ends the trajectory (as the authors' loop does)."""
    trajectory.rounds += 1
    if generation.error is None and generation.text:
        return False
    trajectory.done = True
    if generation.error is not None:
        trajectory.error = generation.error
    elif not trajectory.steps:
        trajectory.error = "the student's first step is empty"
    return True


def _record_step(trajectory: Trajectory, step: Step, models: Models, teacher_ids, extend) -> None:
    """Append the step; `extend`: it becomes part of both models' contexts."""
    trajectory.teacher_context_lengths.append(len(trajectory.teacher_ids))
    trajectory.steps.append(step)
    trajectory.used_tokens += step.tokens
    if extend:
        trajectory.teacher_ids = trajectory.teacher_ids + (
            teacher_ids if teacher_ids is not None else models.teacher.encode(step.text)
        )
        trajectory.student_ids = trajectory.student_ids + models.student.encode(step.text)


def _finish_if_ended(trajectory: Trajectory, step: Step, config: SynthesisConfig) -> None:
    """EOS, a step cut by its length limit, or the spent budget end the trajectory."""
    if step.finish_reason != "stop" or trajectory.used_tokens >= config.max_tokens:
        trajectory.done = True


def _continue_with_teacher(breached: list[Trajectory], models: Models, config) -> None:
    """Eq. 10–11: the teacher writes the rest from the context before step t*."""
    contexts = [t.teacher_ids[: t.teacher_context_lengths[t.t_star]] for t in breached]
    limits = [
        monitor.teacher_budget(config.max_tokens, sum(s.tokens for s in t.steps[: t.t_star]))
        for t in breached
    ]
    seeds = [t.seed(config.seed, "continuation") for t in breached]
    continuations = _generate_by_limit(models.teacher, contexts, limits, seeds, config, stop=())
    for trajectory, continuation in zip(breached, continuations):
        trajectory.done = True
        if continuation.error is None and continuation.text.strip():
            trajectory.continuation = continuation.text
            trajectory.continuation_tokens = len(continuation.token_ids)
        else:  # the student's steps stay as the response
            trajectory.teacher_failed = continuation.error or "empty teacher continuation"


def _value_or_none(score) -> float | None:
    return (
        None
        if score.error is not None or not score.logprobs
        else monitor.oracle_value(score.logprobs)
    )
