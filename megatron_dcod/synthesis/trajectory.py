"""One trajectory's state in the step loops, and the record it becomes."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_dcod.synthesis.monitor import revise_connector
from megatron_dcod.synthesis.prompts import Prompt

GENERATED_BY = ("student", "teacher")
"""Who generates tokens (the inserted connector is text, not generated)."""


@dataclass
class Step:
    """One step of a trajectory, with what the monitor said about it."""

    text: str
    """The step's text, its stop string included."""
    source: str
    """student, or teacher (an SKD rewrite)."""
    tokens: int
    """Tokens generated for it."""
    finish_reason: str
    """stop (the step string), eos or length."""
    value: float | None = None
    """V_T, the teacher's geometric-mean probability of the step (Eq. 5)."""
    boundary: float | None = None
    """ε at the step's context (Eq. 7)."""
    entropy: float | None = None
    """Teacher entropy H at the step's context (Eq. 6)."""
    student_value: float | None = None
    """SKD: the student's own geometric-mean probability of its proposal."""
    accepted: bool = True
    """MOTAB: V_T ≥ ε; SKD: the student's proposal was kept."""
    score_error: str | None = None
    """Why scoring the step failed (MOTAB then counts it safe; SKD sends it to the teacher)."""


@dataclass
class Trajectory:
    """A response in the making for one prompt."""

    prompt: Prompt
    """The prompt it answers."""
    response_index: int
    """Which of the prompt's --responses-per-prompt it is."""
    student_ids: list[int] = field(default_factory=list)
    """The student's context: prompt + accepted steps, in its tokens."""
    teacher_ids: list[int] = field(default_factory=list)
    """The same context in the teacher's tokens."""
    steps: list[Step] = field(default_factory=list)
    teacher_context_lengths: list[int] = field(default_factory=list)
    """Length of teacher_ids before each step (the context a backtrack returns to)."""
    entropy: float | None = None
    """H at the current context (None: not looked up yet)."""
    used_tokens: int = 0
    """Generated tokens so far, against --max-tokens."""
    rounds: int = 0
    """Student steps proposed so far (part of every generation's seed)."""
    breach: bool = False
    """MOTAB: a step fell below its boundary (the trajectory then waits for the teacher)."""
    t_star: int | None = None
    """MOTAB: the root-cause step (Eq. 8–9)."""
    continuation: str | None = None
    """The teacher's text after a breach (or the teacher's whole answer in teacher mode)."""
    continuation_tokens: int = 0
    """Tokens the teacher generated for `continuation`."""
    teacher_failed: str | None = None
    """Why a teacher continuation or rewrite was not available (the student's text stays)."""
    error: str | None = None
    """Why the trajectory produced nothing."""
    done: bool = False
    """Finished: it leaves the live batch."""

    def seed(self, base: int, purpose: str) -> int:
        """A seed per (trajectory, round, purpose), independent of batching."""
        key = f"{base}/{self.prompt.index}/{self.response_index}/{self.rounds}/{purpose}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF

    def segments(self, revise_text: str) -> list[dict[str, str]]:
        """The response as consecutive {source, text} pieces (same sources merged)."""
        pieces = [(step.source, step.text) for step in self.steps]
        if self.continuation is not None:
            if self.steps:
                student_text = "".join(step.text for step in self.steps)
                pieces.append(("inserted", revise_connector(student_text, revise_text)))
            pieces.append(("teacher", self.continuation))
        return _merged_rstripped(pieces)

    def record_fields(self, method: str, revise_text: str) -> dict[str, Any]:
        """What synthesis adds to the prompt's fields (see docs/data_format.md)."""
        segments = self.segments(revise_text)
        fields = {
            "response": "".join(piece["text"] for piece in segments),
            "segments": segments,
            "method": method,
            "prompt_index": self.prompt.index,
            "response_index": self.response_index,
            "steps": [_rounded(asdict(step)) for step in self.steps],
            "breach": self.breach,
            "t_star": self.t_star,
        }
        if self.teacher_failed:
            fields["teacher_failed"] = self.teacher_failed
        return fields

    def tokens_by_source(self) -> dict[str, int]:
        counts = dict.fromkeys(GENERATED_BY, 0)
        for step in self.steps:
            counts[step.source] += step.tokens
        counts["teacher"] += self.continuation_tokens
        return counts


def _merged_rstripped(pieces: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Merge neighbours of one source, drop empty pieces and the response's trailing space
    (chat templates strip it, which would move the text away from its segments)."""
    merged: list[dict[str, str]] = []
    for source, text in pieces:
        if merged and merged[-1]["source"] == source:
            merged[-1]["text"] += text
        elif text:
            merged.append({"source": source, "text": text})
    while merged and not merged[-1]["text"].rstrip():
        merged.pop()
    if merged:
        merged[-1]["text"] = merged[-1]["text"].rstrip()
    return merged


def _rounded(step: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in step.items()}
