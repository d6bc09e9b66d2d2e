"""The benchmarks registry: how each math test set is read and what its defaults are.

Data comes from `--data`: a local JSONL / JSON / Parquet file, a local HF dataset dir
(`save_to_disk` output or data files), or a Hugging Face hub dataset name read with
`datasets.load_dataset(name, config, split=...)`, written `owner/name[:config]` (from the local
cache when offline). Every benchmark
names the fields that hold the problem (the first present one is used) and how the gold answer
is obtained; `custom` reads `problem` / `answer` records.

Sampling defaults follow the protocol of docs/method.md §8: greedy pass@1 on the large sets, the
mean over k samples at T = 0.6, top-p 0.95 on AIME and AMC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_dcod.data.records import RecordError, RecordLocation, iter_raw_records, loads_record
from megatron_dcod.eval.grading import hash_answer, last_boxed

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")  # owner/name[:config]


@dataclass(frozen=True)
class SamplingDefaults:
    """A benchmark's default decoding (each overridable from the command line)."""

    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 4096
    samples: int = 1
    """k: responses per problem."""


GREEDY = SamplingDefaults()
COMPETITION = SamplingDefaults(temperature=0.6, top_p=0.95, max_new_tokens=16384, samples=16)


@dataclass(frozen=True)
class Benchmark:
    """One entry of the registry."""

    name: str
    problem_fields: tuple[str, ...]
    """Fields that may hold the problem statement; the first present non-empty one is used."""
    gold: Callable[[dict], Any]
    """Record -> gold answer text; raises KeyError/ValueError saying what is missing."""
    sampling: SamplingDefaults = GREEDY
    split: str = "test"
    """Split read from HF dataset dirs / hub names."""


@dataclass(frozen=True)
class Problem:
    """One problem to evaluate."""

    index: int
    """0-based position in the data (after --limit): the key of its generations."""
    source_id: str
    """The record's own id when it has one (id / idx / unique_id), else the index."""
    text: str
    gold: str
    location: str
    """file:line or file record N, for messages."""


def answer_text(value: Any) -> str:
    """A gold answer as text: numbers without a spurious '.0', lists joined by ', '."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_text(item) for item in value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("the gold answer is empty")
    return str(value).strip()


def _field(record: dict, name: str) -> Any:
    if record.get(name) in (None, "", []):
        raise KeyError(f"no {name!r} field")
    return record[name]


def gsm8k_gold(record: dict) -> str:
    """GSM8K: the text after '####' in the answer field (thousands separators removed)."""
    gold = hash_answer(str(_field(record, "answer")))
    if gold is None:
        raise ValueError("the 'answer' field has no '#### <answer>' line")
    return gold


def math_gold(record: dict) -> str:
    """MATH-style: the given `answer`, else the last \\boxed{} of the `solution`."""
    if record.get("answer") not in (None, ""):
        return answer_text(record["answer"])
    solution = record.get("solution")
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    if boxed is None:
        raise KeyError("no 'answer' field and no \\boxed{} in a 'solution' field")
    return boxed


def olympiadbench_gold(record: dict) -> str:
    """OlympiadBench: `final_answer`, a list of LaTeX strings ('$69$,$84$' for several)."""
    answers = _field(record, "final_answer")
    answers = answers if isinstance(answers, list) else [answers]
    return ", ".join(str(answer).replace("$", "").strip() for answer in answers)


def custom_gold(record: dict) -> str:
    """A custom JSONL: the `answer` field, as given."""
    return answer_text(_field(record, "answer"))


_PROBLEM = ("problem", "question")
BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", ("question", "problem"), gsm8k_gold, GREEDY),
    "math500": Benchmark("math500", _PROBLEM, math_gold, GREEDY),
    "minerva_math": Benchmark("minerva_math", _PROBLEM, math_gold, GREEDY),
    "olympiadbench": Benchmark(
        "olympiadbench",
        ("question", "problem"),
        olympiadbench_gold,
        SamplingDefaults(max_new_tokens=8192),
    ),
    "aime24": Benchmark("aime24", _PROBLEM, math_gold, COMPETITION),
    "aime25": Benchmark("aime25", _PROBLEM, math_gold, COMPETITION),
    "amc23": Benchmark("amc23", _PROBLEM, math_gold, SamplingDefaults(0.6, 0.95, 16384, samples=8)),
    "custom": Benchmark("custom", ("problem",), custom_gold, GREEDY),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def with_fields(benchmark: Benchmark, problem_field: str | None, answer_field: str | None):
    """The benchmark with --problem-field / --answer-field overrides (the answer then taken
    as given)."""
    problem_fields = (problem_field,) if problem_field else benchmark.problem_fields
    gold = (lambda record: answer_text(_field(record, answer_field))) if answer_field else None
    return Benchmark(
        benchmark.name, problem_fields, gold or benchmark.gold, benchmark.sampling, benchmark.split
    )


def load_problems(
    benchmark: Benchmark, data: str, split: str | None = None, limit: int | None = None
) -> list[Problem]:
    """Read and validate every problem (first `limit`); RecordError names the bad record."""
    problems = []
    for location, payload in _records(data, split or benchmark.split):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_problem(benchmark, len(problems), location, payload))
    if not problems:
        raise ValueError(f"{data}: no problems")
    return problems


def _records(data: str, split: str) -> Iterator[tuple[RecordLocation, Any]]:
    if not Path(data).exists() and _HUB_NAME.match(data):
        import datasets

        name, _, subset = data.partition(":")
        for index, row in enumerate(datasets.load_dataset(name, subset or None, split=split)):
            yield RecordLocation(data, index), row
        return
    yield from iter_raw_records(data, split)


def _problem(benchmark: Benchmark, index: int, location: RecordLocation, payload: Any) -> Problem:
    if isinstance(payload, (bytes, str)):
        payload = loads_record(payload, location)
    if not isinstance(payload, dict):
        raise RecordError(location, f"a record must be a JSON object, got {type(payload).__name__}")
    text = next((payload[f] for f in benchmark.problem_fields if payload.get(f)), None)
    if not isinstance(text, str):
        raise RecordError(location, f"no problem text (fields tried: {benchmark.problem_fields})")
    try:
        gold = benchmark.gold(payload)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise RecordError(location, f"{benchmark.name} gold answer: {message}") from error
    source_id = next((payload[k] for k in ("id", "idx", "unique_id") if k in payload), index)
    return Problem(index, str(source_id), text, gold, str(location))
