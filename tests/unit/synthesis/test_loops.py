"""The step loops on scripted engines: acceptance, breach and backtracking, the budget, EOS,
the entropy-lowered boundary, failure fallbacks, SKD's accept and reject paths."""

import math

import pytest

from megatron_dcod.synthesis.config import SynthesisConfig
from megatron_dcod.synthesis.loops import ROUNDS, LanguageModel, Models, start
from megatron_dcod.synthesis.prompts import Prompt
from megatron_dcod.synthesis.trajectory import Trajectory
from tests.unit.synthesis.scripted import CharTokenizer, ScriptedEngine

P = "Q: 1+1?\n"


def config(**overrides):
    values = dict(method="motab", prompts=("p",), teacher="t", student="s", out="o")
    return SynthesisConfig(**(values | overrides))


def run(method, student, teacher, **overrides):
    settings = config(method=method, **overrides)
    models = Models(
        LanguageModel(teacher, CharTokenizer()), LanguageModel(student, CharTokenizer())
    )
    prompt = Prompt(0, "p:1", {"q": P}, "q", [{"role": "user", "content": P}], P, None)
    trajectory = Trajectory(prompt, 0)
    start(trajectory, models)
    while not trajectory.done:
        ROUNDS[method]([trajectory], models, settings)
    return trajectory, trajectory.record_fields(method, settings.revise_text)


def student_script(*steps):
    """Steps (text, finish) generated one after another from the growing context."""
    table, context = {}, P
    for text, finish in steps:
        table[context] = (text, finish)
        context += text
    return ScriptedEngine(steps=table)


def test_accepted_steps_until_eos_are_the_students_own():
    student = student_script(("A.\n\n", "stop"), ("B.\n\n", "stop"), ("C", "eos"))
    teacher = ScriptedEngine(values={"A.\n\n": 0.9, "B.\n\n": 0.5, "C": 0.3})
    trajectory, record = run("motab", student, teacher)
    assert record["response"] == "A.\n\nB.\n\nC"
    assert record["segments"] == [{"source": "student", "text": "A.\n\nB.\n\nC"}]
    assert not record["breach"] and record["t_star"] is None
    assert [s["value"] for s in record["steps"]] == pytest.approx([0.9, 0.5, 0.3])
    assert [s["boundary"] for s in record["steps"]] == pytest.approx([0.2] * 3)  # H = 0
    assert all(s["accepted"] for s in record["steps"])


def test_breach_backtracks_to_the_sharpest_drop_and_stitches_every_student_step():
    student = student_script(("A.\n\n", "stop"), ("B.\n\n", "stop"), ("C.\n\n", "stop"))
    teacher = ScriptedEngine(values={"A.\n\n": 0.9, "B.\n\n": 0.3, "C.\n\n": 0.1})
    teacher.steps[P + "A.\n\n"] = ("T fixes it.", "eos")
    trajectory, record = run("motab", student, teacher, max_tokens=300)
    assert record["breach"] and record["t_star"] == 1  # -0.6 at step 1 beats -0.2 at step 2
    assert [s["accepted"] for s in record["steps"]] == [True, True, False]
    assert record["response"] == "A.\n\nB.\n\nC.\n\nHowever,\n\nT fixes it."
    assert record["segments"] == [
        {"source": "student", "text": "A.\n\nB.\n\nC.\n\n"},
        {"source": "inserted", "text": "However,\n\n"},
        {"source": "teacher", "text": "T fixes it."},
    ]
    continuation = [c for c in teacher.calls if c[0] == "generate"]
    assert continuation == [("generate", P + "A.\n\n", 300 - 4, ())]  # no stop; budget - A's 4
    assert trajectory.tokens_by_source() == {"student": 12, "teacher": 11}


def test_breach_at_step_zero_returns_to_the_prompt():
    student = student_script(("Bad.\n\n", "stop"))
    teacher = ScriptedEngine(values={"Bad.\n\n": 0.01}, steps={P: ("Good.", "eos")})
    _, record = run("motab", student, teacher, max_tokens=100)
    assert record["t_star"] == 0 and record["response"] == "Bad.\n\nHowever,\n\nGood."
    assert ("generate", P, 256, ()) in teacher.calls  # the teacher's minimum budget


def test_the_budget_caps_each_step_and_ends_the_trajectory():
    student = student_script(("A.\n\n", "stop"), ("B.", "length"))
    teacher = ScriptedEngine()
    _, record = run("motab", student, teacher, max_tokens=6, max_step_tokens=5)
    limits = [c[2] for c in student.calls]
    assert limits == [5, 2]  # min(max_step_tokens, what is left of max_tokens)
    assert record["response"] == "A.\n\nB." and not record["breach"]


def test_teacher_entropy_lowers_the_boundary():
    top4 = [math.log(0.25)] * 4  # H = log 4 after step A: ε = 0.2 / 4 = 0.05
    student = student_script(("A.\n\n", "stop"), ("B", "eos"))
    teacher = ScriptedEngine(values={"A.\n\n": 0.9, "B": 0.1}, topk={P + "A.\n\n": top4})
    _, record = run("motab", student, teacher)
    assert record["steps"][1]["entropy"] == pytest.approx(math.log(4))
    assert record["steps"][1]["boundary"] == pytest.approx(0.05)
    assert not record["breach"]  # 0.1 ≥ 0.05; with H = 0 it would have breached


def test_a_failed_score_counts_as_safe_and_an_empty_step_ends():
    student = student_script(("A.\n\n", "stop"), ("", "stop"))
    teacher = ScriptedEngine(failing={"A.\n\n"})
    trajectory, record = run("motab", student, teacher)
    assert record["steps"][0]["value"] == 1.0 and record["steps"][0]["accepted"]
    assert record["response"] == "A." and trajectory.error is None


def test_a_failed_student_step_fails_the_trajectory():
    student = ScriptedEngine(steps={P: "generation failed: simulated"})
    trajectory, _ = run("motab", student, ScriptedEngine())
    assert trajectory.done and trajectory.error == "generation failed: simulated"


def test_skd_keeps_good_student_steps_and_lets_the_teacher_rewrite_bad_ones():
    student = student_script(("A.\n\n", "stop"))
    student.steps[P + "A.\n\n"] = ("Wrong.\n\n", "stop")
    student.steps[P + "A.\n\nRight.\n\n"] = ("Done", "eos")
    student.values = {"A.\n\n": 0.5, "Wrong.\n\n": 0.9, "Done": 0.5}
    teacher = ScriptedEngine(values={"A.\n\n": 0.5, "Wrong.\n\n": 0.5, "Done": 0.46})
    teacher.steps[P + "A.\n\n"] = ("Right.\n\n", "stop")
    _, record = run("skd", student, teacher)
    assert [(s["source"], s["accepted"]) for s in record["steps"]] == [
        ("student", True),  # 0.5 > 0.9 · 0.5
        ("teacher", False),  # 0.5 ≤ 0.9 · 0.9: rewritten
        ("student", True),  # 0.46 > 0.45
    ]
    assert record["response"] == "A.\n\nRight.\n\nDone"
    assert [s["source"] for s in record["segments"]] == ["student", "teacher", "student"]
    rewrite = [c for c in teacher.calls if c[0] == "generate"]
    assert rewrite == [("generate", P + "A.\n\n", 8192, (".\n\n",))]  # one step, same stop


def test_a_failed_continuation_keeps_the_student_steps():
    student = student_script(("Bad.\n\n", "stop"))
    teacher = ScriptedEngine(values={"Bad.\n\n": 0.01}, steps={P: "generation failed: OOM"})
    trajectory, record = run("motab", student, teacher)
    assert record["breach"] and record["teacher_failed"] == "generation failed: OOM"
    assert record["response"] == "Bad." and trajectory.error is None


def test_skd_failures_go_to_the_teacher_and_a_failed_rewrite_keeps_the_students_step():
    student = student_script(("A.\n\n", "stop"), ("B", "eos"))
    student.values = {"A.\n\n": 0.5, "B": 0.5}
    teacher = ScriptedEngine(failing={"A.\n\n"}, values={"B": 0.9})
    teacher.steps[P] = "generation failed: OOM"
    _, record = run("skd", student, teacher)
    first = record["steps"][0]
    assert not first["accepted"] and first["score_error"] == "scoring failed: simulated"
    assert first["source"] == "student" and record["teacher_failed"] == "generation failed: OOM"
    assert record["response"] == "A.\n\nB" and record["steps"][1]["accepted"]
