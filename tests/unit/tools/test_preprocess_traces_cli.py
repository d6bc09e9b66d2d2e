"""tools/preprocess_traces.py from the command line: every bad input gets a clear error that
names the file and line (or record), and nothing partial is left at the output prefix."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[3]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_tool = load_tool("preprocess_traces")
inspect_tool = load_tool("inspect_traces")


def run_tool(tmp_path, tokenizer_dir, source, *extra):
    prefix = tmp_path / "out" / "ds"
    argv = [
        "--input",
        str(source),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer_dir),
        *map(str, extra),
    ]
    return preprocess_tool.main(argv), prefix


def assert_nothing_left(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


def mutated(record, **changes):
    record = json.loads(json.dumps(record))
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return record


def bad_line_cases(good):
    n = len(good["teacher_logprobs"])
    ids = good["teacher_token_ids"]
    return {
        "missing response": (mutated(good, response=None), "missing field 'response'"),
        "empty response": (mutated(good, response="  "), "field 'response' is empty"),
        "empty prompt": (mutated(good, prompt=""), "field 'prompt' is empty"),
        "empty messages": ({"messages": []}, "'messages' must be a non-empty list"),
        "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
        "message without role": ({"messages": [{"content": "hi"}]}, "needs 'role' and 'content'"),
        "logprobs without ids": (mutated(good, teacher_token_ids=None), "must come together"),
        "length mismatch": (
            mutated(good, teacher_logprobs=good["teacher_logprobs"][:-1]),
            f"{n - 1} teacher log-probs for {n} teacher token ids",
        ),
        "id mismatch": (
            mutated(good, teacher_token_ids=ids[:2] + [ids[2] + 1] + ids[3:]),
            "first difference at response token 2",
        ),
        "missing end-of-turn": (
            mutated(
                good,
                teacher_token_ids=ids[:-1],
                teacher_topk=None,
                teacher_logprobs=good["teacher_logprobs"][:-1],
            ),
            "do not match the student tokenization",
        ),
        "nan": (
            mutated(good, teacher_logprobs=[math.nan] + good["teacher_logprobs"][1:]),
            r"'teacher_logprobs'\[0\] = nan",
        ),
        "inf": (
            mutated(good, teacher_logprobs=good["teacher_logprobs"][:-1] + [-math.inf]),
            rf"'teacher_logprobs'\[{n - 1}\] = -inf",
        ),
        "positive": (
            mutated(good, teacher_logprobs=[0.25] + good["teacher_logprobs"][1:]),
            "must be finite and <= 0",
        ),
        "bad top-k": (mutated(good, teacher_topk=[[{"id": 1}]] * n), "'teacher_topk' is not"),
        "not an object": ([1, 2], "must be a JSON object"),
    }


CASES = list(
    bad_line_cases(
        {
            "prompt": "p",
            "response": "r",
            "teacher_logprobs": [-1.0] * 4,
            "teacher_token_ids": [1, 2, 3, 4],
        }
    )
)


@pytest.mark.parametrize("case", CASES)
def test_bad_record_is_named(case, tmp_path, tokenizer_dir, teacher_records, capsys):
    record, message = bad_line_cases(teacher_records[0])[case]
    lines = [teacher_records[1], teacher_records[2], record]
    source = write_jsonl(tmp_path / "traces.jsonl", lines)
    code, _ = run_tool(tmp_path, tokenizer_dir, source)
    error = capsys.readouterr().err
    assert code == 1
    assert f"{source}:3: " in error, error
    assert re.search(message, error), error
    assert_nothing_left(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path, tokenizer_dir, teacher_records, capsys):
    lines = [teacher_records[0], "", '{"prompt": "unterminated', teacher_records[1]]
    source = write_jsonl(tmp_path / "traces.jsonl", lines)
    code, _ = run_tool(tmp_path, tokenizer_dir, source)
    assert code == 1
    assert f"{source}:3: malformed JSON" in capsys.readouterr().err
    assert_nothing_left(tmp_path)


def test_malformed_json_file(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "traces.json"
    source.write_text('[\n  {"prompt": "a", "response": "b"},\n  {oops}\n]')
    code, _ = run_tool(tmp_path, tokenizer_dir, source)
    assert code == 1
    assert f"{source}:3: malformed JSON" in capsys.readouterr().err
    assert_nothing_left(tmp_path)


def test_skip_bad_counts_in_meta(tmp_path, tokenizer_dir, teacher_records):
    nan_record = mutated(teacher_records[2], teacher_logprobs=[math.nan] * 2)
    lines = [teacher_records[0], "{broken", teacher_records[1], nan_record, teacher_records[3]]
    source = write_jsonl(tmp_path / "traces.jsonl", lines)
    code, prefix = run_tool(tmp_path, tokenizer_dir, source, "--skip-bad")
    assert code == 0
    records = json.loads(Path(f"{prefix}.meta.json").read_text())["records"]
    assert records == {"read": 5, "kept": 3, "skipped_invalid": 1, "skipped_malformed_json": 1}


def test_mixed_teacher_presence_is_refused(tmp_path, tokenizer_dir, teacher_records, capsys):
    plain = {"prompt": "What is 3 * 4?", "response": "12"}
    source = write_jsonl(tmp_path / "traces.jsonl", [teacher_records[0], plain])
    code, _ = run_tool(tmp_path, tokenizer_dir, source)
    assert code == 1
    assert f"{source}:2: trace carries ('tokens', 'loss_mask')" in capsys.readouterr().err
    assert_nothing_left(tmp_path)


def test_unreadable_inputs(tmp_path, tokenizer_dir, teacher_records, capsys):
    code, _ = run_tool(tmp_path, tokenizer_dir, tmp_path / "missing.jsonl")
    assert code == 1 and "missing.jsonl does not exist" in capsys.readouterr().err
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records[:2])
    code, _ = run_tool(tmp_path, tmp_path / "no-tokenizer", source)
    assert code == 1 and "no-tokenizer does not exist" in capsys.readouterr().err
    (tmp_path / "empty-dir").mkdir()
    code, _ = run_tool(tmp_path, tmp_path / "empty-dir", source)
    assert code == 1 and "cannot load a tokenizer from" in capsys.readouterr().err
    assert_nothing_left(tmp_path)


def test_command_line_end_to_end(tmp_path, tokenizer_dir, teacher_records):
    """The scripts as a user runs them: preprocess, rerun (no-op), inspect."""
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records)
    prefix = tmp_path / "out" / "ds"
    command = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_traces.py"),
        "--input",
        str(source),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer_dir),
    ]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"{prefix}: {len(teacher_records)} traces" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "up to date" in again.stderr
    shown = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "inspect_traces.py"), str(prefix), "--index", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"traces               {len(teacher_records)}" in shown
    assert "pos  token" in shown and "logp_teacher" in shown and "teacher_top1" in shown


def test_record_format_and_score_backend_flags(tmp_path, tokenizer_dir, teacher_records, capsys):
    source = write_jsonl(tmp_path / "traces.jsonl", teacher_records[:2])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        run_tool(tmp_path, tokenizer_dir, source, "--record-format", "tgi")
    code, _ = run_tool(tmp_path, tokenizer_dir, source, "--score-backend", "vllm")
    assert code == 1 and "--score-backend vllm needs --score-with" in capsys.readouterr().err
    vllm_on_a_device = ("--score-backend", "vllm", "--score-with", "m", "--score-device", "cuda")
    code, _ = run_tool(tmp_path, tokenizer_dir, source, *vllm_on_a_device)
    assert code == 1 and "--score-device is for --score-backend hf" in capsys.readouterr().err
    assert_nothing_left(tmp_path)
    code, prefix = run_tool(tmp_path, tokenizer_dir, source, "--record-format", "native")
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert code == 0 and meta["config"]["record_format"] == "native"
    assert meta["config"]["scoring"]["backend"] == "hf"
