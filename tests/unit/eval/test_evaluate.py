"""tools/eval_math.py end to end: a tiny local HF model on a 5-problem fixture, metrics that
agree with the per-item grades, resuming, refusals and per-item failures."""

import json

import pytest

from megatron_dcod.eval import evaluate as evaluate_module
from megatron_dcod.inference.engine import Generation
from tests.unit.conftest import write_jsonl
from tools.eval_math import main as eval_math

PROBLEMS = [
    {"problem": "Compute 12 + 7.", "answer": "19"},
    {"problem": "What is 3 * 4?", "answer": "12"},
    {"problem": "Compute 5 + 5 + 1.", "answer": "11"},
    {"problem": "Be brief: 2 + 2?", "answer": "4"},
    {"problem": "Half of 1?", "answer": "\\frac{1}{2}"},
]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)


def _read(out):
    generations = [
        json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()
    ]
    return generations, json.loads((out / "summary.json").read_text())


def _check_summary_agrees(generations, summary, k):
    correct = {}
    for record in generations:
        correct.setdefault(record["problem_index"], []).append(record["correct"])
    assert summary["problems"] == len(correct) and summary["samples_per_problem"] == k
    mean = sum(sum(c) / k for c in correct.values()) / len(correct)
    assert summary["accuracy"]["pass@1"] == pytest.approx(mean)
    n = len(generations)
    assert summary["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in generations) / n)
    tokens = sum(r["num_tokens"] for r in generations) / n
    assert summary["mean_response_tokens"] == pytest.approx(tokens)
    assert summary["repetition_rate"] == pytest.approx(
        sum(r["repetition"] for r in generations) / n
    )


def test_tiny_model_end_to_end(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--benchmark", "custom", "--data", str(data)]
    argv += ["--out", str(out), "--max-new-tokens", "10", "--batch-size", "2"]
    assert eval_math(argv) == 0
    assert sorted(path.name for path in out.iterdir()) == [
        "generations.jsonl", "report.md", "run_config.json", "summary.json"
    ]  # fmt: skip
    generations, summary = _read(out)
    assert [(r["problem_index"], r["sample"]) for r in generations] == [(i, 0) for i in range(5)]
    assert [r["gold"] for r in generations] == [p["answer"] for p in PROBLEMS]
    assert all(r["response"] and r["num_tokens"] == 10 and r["truncated"] for r in generations)
    assert all(not r["correct"] and r["reason"] == "no answer found" for r in generations)
    _check_summary_agrees(generations, summary, 1)
    assert summary["settings"]["temperature"] == 0.0 and summary["backend"] == "hf"
    assert summary["grader"].startswith("math-verify ")
    assert summary["throughput"]["generated_tokens"] == 50
    report = (out / "report.md").read_text()
    assert "| pass@1 | 0.00 |" in report and "| truncation rate (%) | 100.00 |" in report
    assert "| pass@1 | 0.00 |" in capsys.readouterr().out


class ScriptedBackend:
    """Answers each problem with the next of its scripted responses; counts what it generates."""

    name = "scripted"

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.generated = tokenizer, script, []

    def generate(self, prompts, sampling, seeds):
        results = []
        for ids in prompts:
            prompt = self.tokenizer.decode(ids)
            problem = next(p for p in self.script if p in prompt)
            response = self.script[problem][sum(g == problem for g in self.generated) % 4]
            self.generated.append(problem)
            ids = self.tokenizer(response)["input_ids"] if response is not None else []
            error = "generation failed: simulated" if response is None else None
            results.append(Generation(response or "", ids, None if error else "eos", error=error))
        return results


SCRIPT = {  # four samples per problem: 4, 2, 1 and 0 right, one generation failure
    "Compute 12 + 7.": ["\\boxed{19}"] * 4,
    "What is 3 * 4?": ["\\boxed{12}", "#### 12", "\\boxed{13}", "no idea"],
    "Compute 5 + 5 + 1.": ["\\boxed{10}", "\\boxed{10}", "\\boxed{11}", None],
    "Be brief: 2 + 2?": ["\\boxed{5}"] * 4,
    "Half of 1?": ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}", "\\boxed{0.25}"],
}


@pytest.fixture
def scripted(monkeypatch, chat_tokenizer):
    backend = ScriptedBackend(chat_tokenizer.tokenizer, SCRIPT)
    monkeypatch.setattr(evaluate_module, "_make_backend", lambda config, tokenizer: backend)
    return backend


def _argv(tiny_model_dir, data, out, *extra):
    argv = ["--model", str(tiny_model_dir), "--benchmark", "custom", "--data", str(data)]
    return argv + [
        "--out",
        str(out),
        "--temperature",
        "0.6",
        "-k",
        "4",
        "--batch-size",
        "3",
        *extra,
    ]


def test_metrics_agree_with_the_per_item_grades(tiny_model_dir, data, tmp_path, scripted):
    out = tmp_path / "out"
    assert eval_math(_argv(tiny_model_dir, data, out)) == 0
    generations, summary = _read(out)
    assert len(generations) == 20
    _check_summary_agrees(generations, summary, 4)
    assert summary["accuracy"]["pass@1"] == pytest.approx((4 + 2 + 1 + 0 + 2) / 20)
    assert summary["accuracy"]["pass@4"] == pytest.approx(4 / 5)
    assert summary["accuracy"]["maj@4"] == pytest.approx(3 / 5)  # 19, 12, 0.5 win their votes
    failed = [r for r in generations if r["reason"] == "generation failed: simulated"]
    assert len(failed) == 1 and not failed[0]["correct"]
    assert summary["grades"] == {
        "correct": 9, "wrong answer": 9, "no answer found": 1, "generation failed": 1
    }  # fmt: skip


def test_resume_regenerates_only_what_is_missing(tiny_model_dir, data, tmp_path, scripted):
    out = tmp_path / "out"
    assert eval_math(_argv(tiny_model_dir, data, out)) == 0
    lines = (out / "generations.jsonl").read_bytes().splitlines(keepends=True)
    # a crash: the last two chunks' lines lost, the line before cut mid-write
    (out / "generations.jsonl").write_bytes(b"".join(lines[:14]) + lines[14][:25])
    first_summary = json.loads((out / "summary.json").read_text())
    scripted.generated.clear()
    assert eval_math(_argv(tiny_model_dir, data, out)) == 0
    assert len(scripted.generated) == 6  # items 14..19 only
    generations, summary = _read(out)
    assert sorted((r["problem_index"], r["sample"]) for r in generations) == [
        (p, s) for p in range(5) for s in range(4)
    ]
    assert summary["accuracy"] == first_summary["accuracy"]
    scripted.generated.clear()
    assert eval_math(_argv(tiny_model_dir, data, out)) == 0 and scripted.generated == []


def test_resume_refuses_other_settings_or_data(tiny_model_dir, data, tmp_path, scripted, capsys):
    out = tmp_path / "out"
    assert eval_math(_argv(tiny_model_dir, data, out)) == 0
    assert eval_math(_argv(tiny_model_dir, data, out, "--max-new-tokens", "99")) == 1
    assert "max_new_tokens: 4096 -> 99" in capsys.readouterr().err
    changed = write_jsonl(tmp_path / "problems.jsonl", [{"problem": "New?", "answer": "1"}])
    assert eval_math(_argv(tiny_model_dir, changed, out)) == 1
    assert "problem 0 of the earlier run differs" in capsys.readouterr().err


def test_bad_input_and_settings(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    argv = ["--model", str(tiny_model_dir), "--benchmark", "custom", "--out", str(tmp_path / "o")]
    assert eval_math(argv + ["--data", str(bad)]) == 1
    assert f"{bad}:2: custom gold answer: no 'answer' field" in capsys.readouterr().err
    assert eval_math(argv + ["--data", str(bad), "--limit", "1", "-k", "2"]) == 1
    assert "2 samples per problem need --temperature > 0" in capsys.readouterr().err
    assert eval_math(argv + ["--data", str(bad), "--limit", "1", "--prompt-template", "x"]) == 1
    assert "must contain {problem}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gold_vs_gold_mode(tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "x\n#### 1,234"}])
    assert eval_math(["--benchmark", "gsm8k", "--data", str(data), "--gold-vs-gold"]) == 0
    assert "gold vs gold: 1/1 graded correct" in capsys.readouterr().out
