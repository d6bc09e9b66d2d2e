"""The grader against a hand-checked table, and its extraction and failure handling."""

import threading

import pytest

from megatron_dcod.eval import grading
from megatron_dcod.eval.grading import Grader, hash_answer, last_boxed, strip_thousands_separators

# (response, gold, correct): each verdict checked by hand.
CASES = [
    # numbers, fractions, decimals
    ("The answer is \\boxed{18}.", "18", True),
    ("The answer is \\boxed{17}.", "18", False),
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("so \\boxed{0.5}", "\\frac{1}{2}", True),
    ("so \\boxed{\\dfrac{3}{4}}", "\\frac34", True),
    ("so \\boxed{0.33}", "\\frac{1}{3}", False),
    ("\\boxed{-7}", "-7", True),
    ("\\boxed{7}", "-7", False),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("\\boxed{025}", "25", True),  # AIME answers are written with leading zeros
    ("\\boxed{10\\%}", "10", True),
    # GSM8K style: '####', thousands separators
    ("She earns 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("Total: 1234 cents.\n#### 1,234", "1234", True),
    ("\\boxed{1,234}", "1234", True),
    ("\\boxed{\\$1,234}", "1234", True),
    ("#### 1,235", "1234", False),
    # units
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{12 \\text{ dollars}}", "12", True),
    # intervals, sets, tuples, matrices, expressions
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(1, 2]}", "[1,2)", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", True),
    ("\\boxed{1, 3, 5}", "1,3,5", True),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    (
        "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        True,
    ),
    (
        "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}}",
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        False,
    ),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
    ("\\boxed{x^2 + 1}", "(x+1)^2", False),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    # where the box is: within text, two boxes (the last counts), nested braces, \fbox
    ("First I thought \\boxed{3}, but rechecking, the answer is \\boxed{4}.", "4", True),
    ("First I thought \\boxed{4}, but rechecking, the answer is \\boxed{3}.", "4", False),
    ("We get $x = \\boxed{\\frac{2}{3}}$ as required.", "\\frac23", True),
    ("\\fbox{42}", "42", True),
    # no box: '####' above, an answer phrase, else nothing
    ("After simplifying, the final answer is 42.", "42", True),
    ("I computed 41 and 42 along the way.", "42", False),
    ("", "42", False),
    ("   \n", "42", False),
]


@pytest.fixture(scope="module")
def grader():
    return Grader(timeout_seconds=5)


@pytest.mark.parametrize("response,gold,correct", CASES)
def test_hand_checked_cases(grader, response, gold, correct):
    grade = grader.grade(response, gold)
    assert grade.correct is correct, grade
    assert (grade.reason == "correct") is correct


def test_table_is_large_and_balanced():
    assert len(CASES) >= 30
    assert 10 <= sum(not correct for _, _, correct in CASES) <= len(CASES) - 10


def test_reasons_say_why(grader):
    assert grader.grade("", "1").reason == "empty output"
    assert grader.grade("I have no idea.", "1") == grading.Grade(False, None, "no answer found")
    assert grader.grade("\\boxed{2}", "1") == grading.Grade(False, "2", "wrong answer")
    assert grader.grade("\\boxed{1}", "1") == grading.Grade(True, "1", "correct")


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("so \\boxed 5$.") == "5"
    assert last_boxed("\\boxed{never closed") is None
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"


def test_hash_answer_and_separators():
    assert hash_answer("work\n#### 1,234\n") == "1234"
    assert hash_answer("#### 3\nmore\n#### 5") == "5"
    assert hash_answer("no hashes") is None
    assert strip_thousands_separators("12,345.5") == "12345.5"
    assert strip_thousands_separators("1,3,5") == "1,3,5"  # a list, not a number
    assert strip_thousands_separators("1,23") == "1,23"


def test_timeout_grades_wrong_and_the_next_item_still_grades(grader, monkeypatch):
    import math_verify

    def hang(*args, **kwargs):
        raise math_verify.errors.TimeoutException("Operation timed out!")

    monkeypatch.setattr(grader._mv, "verify", hang)
    assert grader.grade("\\boxed{1}", "1") == grading.Grade(False, "1", "grading timed out")
    monkeypatch.undo()
    assert grader.grade("\\boxed{1}", "1").correct


def test_a_real_alarm_interrupts_a_slow_comparison(monkeypatch):
    """math-verify's SIGALRM timeout fires in the main thread and becomes a wrong grade."""
    import time

    import math_verify.grader

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", lambda *a, **k: time.sleep(3))
    started = time.perf_counter()
    grade = Grader(timeout_seconds=1).grade("\\boxed{1}", "1")
    assert grade.correct is False and grade.reason == "grading timed out"
    assert time.perf_counter() - started < 2.5


def test_errors_inside_grading_become_a_reason(grader, monkeypatch):
    monkeypatch.setattr(grader._mv, "verify", lambda *a, **k: 1 / 0)
    grade = grader.grade("\\boxed{1}", "1")
    assert not grade.correct and grade.reason.startswith("grading error: ZeroDivisionError")


def test_refuses_to_run_outside_the_main_thread():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_make_grader_error()))
    thread.start()
    thread.join()
    assert "main thread" in errors[0]


def _make_grader_error() -> str:
    try:
        Grader()
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_grader_version_is_the_installed_one():
    from importlib.metadata import version

    assert grading.grader_version() == f"math-verify {version('math-verify')}"
