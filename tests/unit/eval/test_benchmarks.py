"""The registry reads every benchmark format (fixtures written here, shaped like the public
files), gold-vs-gold grades 100 % on them, and bad data fails naming file and line."""

import json

import pytest

from megatron_dcod.data.records import RecordError
from megatron_dcod.eval.benchmarks import BENCHMARKS, get_benchmark, load_problems, with_fields
from megatron_dcod.eval.grading import Grader
from tests.unit.conftest import write_jsonl

# Records in each benchmark's published layout; golds chosen to exercise its answer rule.
FIXTURES = {
    "gsm8k": [
        {"question": "Ducks lay 16 eggs ...", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
        {"question": "A big sum?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    ],
    "math500": [
        {"problem": "Convert (0,3) to polar.", "solution": "... \\boxed{(3, \\frac{\\pi}{2})}",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "unique_id": "test/pc/1.json"},
        {"problem": "Find x.", "solution": "so $x = \\boxed{[2, 5)}$", "answer": "[2,5)"},
        {"problem": "Which day?", "solution": "\\boxed{\\text{Monday}}",
         "answer": "\\text{Monday}"},
    ],
    "minerva_math": [
        {"problem": "Image diameter?", "solution": "s = \\boxed{1.6} \\mathrm{~cm}", "idx": 0},
        {"problem": "Energy?", "solution": "first \\boxed{2} then \\boxed{4.5e-5}", "idx": 1},
    ],
    "olympiadbench": [
        {"id": 1606, "question": "How many moves?", "final_answer": ["2"],
         "is_multiple_answer": False},
        {"id": 1607, "question": "Find all pairs.", "final_answer": ["$69$,$84$"],
         "is_multiple_answer": True},
        {"id": 1608, "question": "Find a_n.", "final_answer": ["$\\frac{1}{2 n+2}$"]},
        {"id": 1609, "question": "Triples?", "final_answer": ["$(1,8,19), (2,7,13)$"]},
    ],
    "aime24": [{"id": 60, "problem": "Aya walks ...", "solution": "...", "answer": "025"}],
    "aime25": [{"problem": "Find the sum ...", "answer": "70"}],
    "amc23": [{"id": 0, "problem": "Cities A and B ...", "answer": 27.0}],
    "custom": [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "Half?", "answer": 0.5}],
}  # fmt: skip

EXPECTED_GOLD = {
    "gsm8k": ["13", "1234"],
    "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "[2,5)", "\\text{Monday}"],
    "minerva_math": ["1.6", "4.5e-5"],
    "olympiadbench": ["2", "69,84", "\\frac{1}{2 n+2}", "(1,8,19), (2,7,13)"],
    "aime24": ["025"],
    "aime25": ["70"],
    "amc23": ["27"],
    "custom": ["5", "0.5"],
}


@pytest.fixture(scope="module")
def grader():
    return Grader()


def test_every_benchmark_has_a_fixture():
    assert set(FIXTURES) == set(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_gold_answers_and_gold_vs_gold(tmp_path, grader, name):
    data = write_jsonl(tmp_path / f"{name}.jsonl", FIXTURES[name])
    problems = load_problems(get_benchmark(name), str(data))
    assert [problem.gold for problem in problems] == EXPECTED_GOLD[name]
    assert all(problem.text for problem in problems)
    for problem in problems:
        assert grader.grade(f"Thus $\\boxed{{{problem.gold}}}$.", problem.gold).correct, problem
    if len(problems) > 1:  # and a different problem's gold is wrong: the check can fail
        shifted = problems[1:] + problems[:1]
        for problem, other in zip(problems, shifted):
            assert not grader.grade(f"\\boxed{{{other.gold}}}", problem.gold).correct


def test_source_ids_and_limit(tmp_path):
    data = write_jsonl(tmp_path / "o.jsonl", FIXTURES["olympiadbench"])
    problems = load_problems(get_benchmark("olympiadbench"), str(data), limit=2)
    assert [(p.index, p.source_id) for p in problems] == [(0, "1606"), (1, "1607")]
    assert problems[1].location == f"{data}:2"


def test_field_overrides(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"q": "1 + 1?", "solution_value": 2}])
    benchmark = with_fields(get_benchmark("custom"), "q", "solution_value")
    (problem,) = load_problems(benchmark, str(data))
    assert (problem.text, problem.gold) == ("1 + 1?", "2")


def test_hf_dataset_dir(tmp_path):
    import datasets

    rows = FIXTURES["math500"]
    fields = {"problem": [r["problem"] for r in rows], "answer": [r["answer"] for r in rows]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(fields)}).save_to_disk(tmp_path / "d")
    problems = load_problems(get_benchmark("math500"), str(tmp_path / "d"))
    assert [p.gold for p in problems] == EXPECTED_GOLD["math500"]


@pytest.mark.parametrize(
    "name,record,message",
    [
        ("gsm8k", {"question": "q", "answer": "no hashes"}, "no '#### <answer>' line"),
        ("gsm8k", {"answer": "#### 3"}, "no problem text"),
        ("math500", {"problem": "p", "solution": "no box"}, "no 'answer' field and no \\\\boxed"),
        ("olympiadbench", {"question": "q", "final_answer": []}, "no 'final_answer' field"),
        ("custom", {"problem": "p", "answer": "  "}, "the gold answer is empty"),
        ("custom", {"problem": "p"}, "no 'answer' field"),
        ("custom", ["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, name, record, message):
    good = FIXTURES[name][0]
    data = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(RecordError, match=message) as error:
        load_problems(get_benchmark(name), str(data))
    assert str(error.value).startswith(f"{data}:2:")


def test_unreadable_data(tmp_path):
    (tmp_path / "broken.jsonl").write_text(
        json.dumps({"problem": "p", "answer": "1"}) + "\n{oops\n"
    )
    with pytest.raises(RecordError, match=r"broken.jsonl:2: malformed JSON"):
        load_problems(get_benchmark("custom"), str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(get_benchmark("custom"), str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(get_benchmark("custom"), str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'; known: gsm8k"):
        get_benchmark("gsm9k")


def test_hub_dataset_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return FIXTURES["gsm8k"]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    problems = load_problems(get_benchmark("gsm8k"), "openai/gsm8k:main", split="test")
    assert [p.gold for p in problems] == EXPECTED_GOLD["gsm8k"]
    assert problems[1].location == "openai/gsm8k:main record 1"
    load_problems(get_benchmark("aime25"), "someone/aime25")
    assert calls == [("openai/gsm8k", "main", "test"), ("someone/aime25", None, "test")]
