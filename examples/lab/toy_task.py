"""The lab's toy tasks: the quickstart's arithmetic in four regimes, each a ready lab spec.

A regime is a chain length and a student:

    chain    short: 2–4 operations a problem (the quickstart's); long: 6–8, where a wrong
             running total early on spoils every later step
    student  cold: the quickstart's student (200 steps of mostly its own style: it rarely
             solves a problem: 12%); warm: the same model trained 1.6× longer (58%: a fair share
             in its own style) before distillation

Per chain (shared by both students): tokenizer, teacher, teacher traces, held-out problems.
Per student: the student, and three trace datasets made with the project's tools —
`traces` (the teacher's, with iw-SFT's ref_logprobs from this student), `motab` and `skd`
(tools/synthesize_traces.py with this student and the teacher, scored by the teacher).
Every stage is skipped when its output exists.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"
sys.path[:0] = [str(QUICKSTART), str(HERE.parents[1])]

import run as quickstart  # noqa: E402  (examples/quickstart/run.py)

CHAINS = {"short": ((2, 4), 96, 400), "long": ((6, 8), 192, 1200)}
"""Operations per problem, the token budget of a response, the teacher's pre-training steps
(400 steps leave the long-chain teacher right on 18% of its samples: too few traces)."""
STUDENT_STEPS = {"cold": 200, "warm": 320}
"""Pre-training steps of the student (batch 32)."""
TEACHER = (96, 3, 4)
STUDENT = (64, 2, 4)
SYNTHESIS_PROMPTS = 400
"""Trace problems MOTAB and SKD write trajectories for (one each)."""


@dataclass(frozen=True)
class Regime:
    chain: str
    student: str

    @property
    def name(self) -> str:
        return f"{self.student}-{self.chain}"


def parse_regime(text: str) -> Regime:
    student, _, chain = text.partition("-")
    if student not in STUDENT_STEPS or chain not in CHAINS:
        raise ValueError(f"regime {text!r}: one of {', '.join(all_regime_names())}")
    return Regime(chain, student)


def all_regime_names() -> list[str]:
    return [f"{student}-{chain}" for chain in CHAINS for student in STUDENT_STEPS]


def prepare(regime: Regime, out: Path, synthesized=("motab", "skd")) -> dict[str, Path]:
    """Build what the regime's lab needs (the `synthesized` datasets of motab and skd among
    them); returns its paths (task dir and student dir)."""
    task, student_dir = out / f"task-{regime.chain}", out / f"task-{regime.chain}" / regime.student
    operations, max_tokens, teacher_steps = CHAINS[regime.chain]
    problems = quickstart.task_problems(operations)
    if not (task / "tokenizer").exists():
        quickstart.make_tokenizer(problems["train"], task / "tokenizer")
    _pretrain(task / "teacher", task / "tokenizer", "teacher", problems["train"], teacher_steps)
    data = task / "data"
    if not (data / "heldout.jsonl").exists():
        quickstart.write_traces(task / "teacher", problems, data, max_tokens)
    steps = STUDENT_STEPS[regime.student]
    _pretrain(student_dir / "student", task / "tokenizer", "student", problems["train"], steps)
    _preprocess(data / "teacher_traces.jsonl", student_dir / "data" / "traces", task, student_dir)
    for method in synthesized:
        _synthesize(method, problems, task, student_dir, max_tokens)
    return {"task": task, "student_dir": student_dir}


def _pretrain(directory: Path, tokenizer_dir: Path, role: str, problems, steps: int) -> None:
    if not quickstart.is_hf_dir(directory):
        print(f"\n{role} → {directory}: {steps} steps", flush=True)
        size = TEACHER if role == "teacher" else STUDENT
        quickstart.pretrain_model(directory, tokenizer_dir, role, problems, *size, steps)


def _preprocess(records: Path, prefix: Path, task: Path, student_dir: Path, *score) -> None:
    from megatron_dcod.data.trace_format import meta_path

    if meta_path(prefix).exists():
        return
    quickstart.run(quickstart.tool(
        "preprocess_traces.py", "--input", records, "--output-prefix", prefix,
        "--tokenizer", task / "tokenizer", "--workers", "2", "--max-seq-length", "256",
        "--ref-model", student_dir / "student", *score,
    ))  # fmt: skip


def _synthesize(method: str, problems, task: Path, student_dir: Path, max_tokens: int) -> None:
    """MOTAB or SKD trajectories by this student and the teacher, scored by the teacher."""
    records = student_dir / "data" / f"{method}.jsonl"
    summary = Path(f"{records}.summary.json")
    if not (summary.exists() and json.loads(summary.read_text())["complete"]):
        prompts = student_dir / "data" / "synthesis_prompts.jsonl"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        chosen = problems["traces"][:SYNTHESIS_PROMPTS]
        quickstart.write_jsonl(
            prompts, [{"problem": p.text, "answer": str(p.answer)} for p in chosen]
        )
        flags = list(quickstart.MOTAB_FLAGS)
        for flag in ("--max-step-tokens", "--max-tokens"):
            flags[flags.index(flag) + 1] = str(max_tokens)
        quickstart.run(quickstart.tool(
            "synthesize_traces.py", "--method", method, "--prompts", prompts,
            "--teacher", task / "teacher", "--student", student_dir / "student",
            "--out", records, *flags,
        ))  # fmt: skip
    prefix = student_dir / "data" / method
    _preprocess(records, prefix, task, student_dir, "--score-with", task / "teacher")
