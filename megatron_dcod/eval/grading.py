"""Answer extraction and grading with math-verify (the version pinned in setup.py).

Protocol (docs/method.md §8): the answer of a response is its last \\boxed{} (\\fbox{} too); a
response without one is read by its last `#### answer` line (the GSM8K style), else by an
explicit answer phrase ("the final answer is ...", "answer: ..."), else it has no answer and is
wrong. Gold and extracted answers are both parsed by math-verify as the content of a \\boxed{},
then compared symbolically (`math_verify.verify`: numbers, fractions, sets, intervals,
matrices, equations; strings when parsing fails).

math-verify times its parsing and comparison out with SIGALRM, which only works in the main
thread: the Grader refuses to run elsewhere, and a timeout grades the response wrong with the
reason recorded instead of stopping the run.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from importlib.metadata import version

BOX_COMMANDS = ("\\boxed", "\\fbox")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")  # 1,234 or 12,345.5
_HASH_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def grader_version() -> str:
    """Reported with every number (docs/method.md §8)."""
    return f"math-verify {version('math-verify')}"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or of a
    brace-less `\\boxed 5`; None when there is none or the last box is never closed."""
    start = max(text.rfind(command) for command in BOX_COMMANDS)
    if start < 0:
        return None
    command = next(command for command in BOX_COMMANDS if text.startswith(command, start))
    after = text[start + len(command) :]
    if after.startswith(" "):  # \boxed 5
        return re.split(r"[\s$]", after.lstrip(), maxsplit=1)[0] or None
    depth = 0
    for position, char in enumerate(after if after.startswith("{") else ""):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return after[1:position]
    return None


def hash_answer(text: str) -> str | None:
    """The answer after the last `####` (GSM8K's gold format), thousands separators removed."""
    matches = _HASH_ANSWER.findall(text)
    return strip_thousands_separators(matches[-1]) if matches else None


def strip_thousands_separators(answer: str) -> str:
    """'1,234' -> '1234'; anything that is not a plain grouped number is left as it is (so
    '1,3,5' stays a list)."""
    answer = answer.strip()
    return answer.replace(",", "") if _THOUSANDS.match(answer) else answer


@dataclass(frozen=True)
class Grade:
    """The verdict on one response."""

    correct: bool
    extracted: str | None
    """The answer read from the response (None: none found)."""
    reason: str
    """'correct', 'wrong answer', 'no answer found', 'empty output', or what failed."""


class Grader:
    """Grades responses against gold answers; the gold of each problem is parsed once."""

    def __init__(self, timeout_seconds: int = 5):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("grading must run in the main thread (math-verify uses SIGALRM)")
        import math_verify

        self._mv = math_verify
        self.timeout_seconds = timeout_seconds
        self._boxed = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]
        self._boxed.append(math_verify.ExprExtractionConfig())
        self._anchored = [
            math_verify.LatexExtractionConfig(try_extract_without_anchor=False),
            math_verify.ExprExtractionConfig(try_extract_without_anchor=False),
        ]
        self._gold_cache: dict[str, list] = {}

    def parse_answer(self, answer: str) -> list:
        """math-verify's reading of an answer string as the content of a \\boxed{}."""
        answer = strip_thousands_separators(answer.strip().strip("$").strip())
        return self._parse("\\boxed{" + answer + "}", self._boxed)

    def gold(self, gold: str) -> list:
        if gold not in self._gold_cache:
            self._gold_cache[gold] = self.parse_answer(gold)
        return self._gold_cache[gold]

    def extract(self, response: str) -> str | None:
        """The answer a response gives, by the protocol of the module docstring."""
        for reader in (last_boxed, hash_answer):
            answer = reader(response)
            if answer is not None and answer.strip():
                return answer.strip()
        anchored = self._parse(response[-2000:], self._anchored)
        return str(anchored[-1]) if anchored else None

    def grade(self, response: str, gold: str) -> Grade:
        """Never raises for a bad response: failures become a wrong grade with the reason."""
        if not response.strip():
            return Grade(False, None, "empty output")
        extracted = None
        try:
            extracted = self.extract(response)
            if extracted is None:
                return Grade(False, None, "no answer found")
            gold_parsed = self.gold(gold)
            if not gold_parsed:
                return Grade(False, extracted, f"gold answer {gold!r} cannot be parsed")
            predicted = self.parse_answer(extracted)
            correct = bool(predicted) and self._mv.verify(
                gold_parsed, predicted, timeout_seconds=self.timeout_seconds, raise_on_error=True
            )
        except self._mv.errors.TimeoutException:
            return Grade(False, extracted, "grading timed out")
        except Exception as error:  # sympy can fail in many ways on odd input
            return Grade(False, extracted, f"grading error: {error!r}"[:300])
        return Grade(correct, extracted, "correct" if correct else "wrong answer")

    def _parse(self, text: str, config: list) -> list:
        return self._mv.parse(
            text, extraction_config=config, parsing_timeout=self.timeout_seconds,
            raise_on_error=True,
        )  # fmt: skip
