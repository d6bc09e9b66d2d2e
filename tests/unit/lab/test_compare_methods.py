"""tools/compare_methods.py end to end on tiny models (the CI smoke test of the lab): a spec of
SFT, DCOD and a broken method × 1 seed, a few steps each; figures that agree with each stage's
own output, resuming without rerunning, a failed run that does not stop the others."""

import json
from pathlib import Path

import pytest

from megatron_dcod.lab.spec import SpecError, load_spec
from tests.helpers.models import save_tiny_student, tokenizer_fingerprint
from tests.helpers.traces import write_synthetic_traces
from tests.unit.conftest import write_jsonl
from tools.compare_methods import main as compare_methods

PROBLEMS = [{"problem": f"Compute {a} + {b}.", "answer": str(a + b)} for a, b in
            [(1, 2), (3, 4), (5, 6)]]  # fmt: skip
TRAIN = ["--split", "90,10,0", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--zero-stage", "0", "--train-iters", "3", "--lr", "1e-3",
         "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--num-workers", "0"]  # fmt: skip


def write_spec(root: Path, methods: dict) -> Path:
    spec = {
        "name": "smoke",
        "student": "student",
        "teacher": "teacher",
        "datasets": {"teacher": "traces"},
        "seeds": [7],
        "train": TRAIN,
        "methods": methods,
        "evals": {"heldout": {"data": "heldout.jsonl", "flags": [
            "--prompt-template", "{problem}", "--max-new-tokens", "6"]}},
        "drift": {"data": "heldout.jsonl", "flags": [
            "--prompt-template", "{problem}", "--num-prompts", "2", "--samples", "2",
            "--max-new-tokens", "6", "--report-lengths", "2", "4"]},
    }  # fmt: skip
    path = root / "lab.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    student = save_tiny_student(root / "student")
    save_tiny_student(root / "teacher", seed=1)
    fingerprint = tokenizer_fingerprint(student)
    write_synthetic_traces(root / "traces", count=24, vocab=fingerprint["vocab_size"],
                           lengths=(6, 16), fingerprint=fingerprint)  # fmt: skip
    write_jsonl(root / "heldout.jsonl", PROBLEMS)
    methods = {
        "sft": {"flags": ["--dcod-weighting", "sft"], "label": "SFT"},
        "dcod": {"flags": ["--dcod-weighting", "dcod", "--dcod-offset", "-5"]},
        "broken": {"flags": ["--dcod-weighting", "nonsense"]},
    }
    spec = write_spec(root, methods)
    code = compare_methods(["--spec", str(spec), "--out", str(root / "out")])
    return root, spec, code


def test_the_lab_reports_every_finished_run_and_its_figures(lab):
    root, _, code = lab
    out = root / "out"
    assert code == 1  # the broken method failed; the others ran
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == ["broken.seed7"]
    by_name = {method["method"]: method for method in results["methods"]}
    for name in ("sft", "dcod"):
        (run,) = by_name[name]["runs"]
        summary = json.loads((out / "runs" / f"{name}.seed7/eval/heldout/summary.json").read_text())
        assert run["accuracy"]["heldout"] == summary["accuracy"]["pass@1"]
        drift = json.loads((out / "runs" / f"{name}.seed7/drift/summary.json").read_text())
        assert run["exacc_err"] == {n: drift["at"][n]["exacc_err"] for n in ("2", "4", "6")}
        assert run["val_loss"] > 0 and run["teacher_ce"] > 0
        assert len(run["weight_by_position"]) >= 4
        assert by_name[name]["summary"]["seeds"] == 1
    sft, dcod = by_name["sft"]["runs"][0], by_name["dcod"]["runs"][0]
    assert sft["w_mean"] == 1.0 and set(sft["weight_by_position"]) == {1.0}
    assert 0 < dcod["w_mean"] < 2 and dcod["w_mean"] != 1.0
    assert all(0 < w < 2 for w in dcod["weight_by_position"])
    table = (out / "results.md").read_text()
    assert "| student (before) |" in table and "| SFT | teacher |" in table
    assert "| dcod | teacher |" in table and "not finished: broken.seed7" in table
    for plot in ("accuracy.png", "exacc_err.png", "weights_by_position.png"):
        assert (out / plot).stat().st_size > 0


def test_a_failed_run_is_marked_and_its_log_kept(lab):
    root, _, _ = lab
    failed = root / "out" / "runs" / "broken.seed7"
    assert "train (exit" in (failed / "FAILED").read_text()
    assert "nonsense" in (failed / "logs" / "train.log").read_text()
    assert not (root / "out" / "runs" / "sft.seed7" / "FAILED").exists()


def test_rerunning_resumes_without_redoing_finished_stages(lab, capsys):
    root, spec, _ = lab
    timings = (root / "out" / "runs" / "sft.seed7" / "timings.json").read_text()
    capsys.readouterr()
    code = compare_methods(["--spec", str(spec), "--out", str(root / "out"), "--only",
                            "sft.seed7", "dcod.seed7", "initial"])  # fmt: skip
    assert code == 0
    assert "10 stages done, 0 to run" in capsys.readouterr().out
    assert (root / "out" / "runs" / "sft.seed7" / "timings.json").read_text() == timings


def test_list_runs_and_unknown_runs(lab, capsys):
    root, spec, _ = lab
    assert compare_methods(["--spec", str(spec), "--out", str(root / "o"), "--list-runs"]) == 0
    assert capsys.readouterr().out.split() == ["initial", "sft.seed7", "dcod.seed7", "broken.seed7"]
    assert compare_methods(["--spec", str(spec), "--out", str(root / "o"), "--only", "x"]) == 1
    assert "unknown runs ['x']" in capsys.readouterr().err


def test_spec_errors_name_the_file_and_key(lab, tmp_path):
    root, spec, _ = lab
    raw = json.loads(spec.read_text())
    bad = dict(raw, methods={"m": {"data": "motab"}})
    (root / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError, match=r"bad.json: methods.m.data: unknown dataset 'motab'"):
        load_spec(root / "bad.json")
    (root / "noseed.yaml").write_text("datasets: {teacher: traces}\nseeds: []\n")
    with pytest.raises(SpecError, match=r"noseed.yaml: seeds: a non-empty list"):
        load_spec(root / "noseed.yaml")
    missing = dict(raw, datasets={"teacher": "nowhere"})
    (root / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(SpecError, match=r"datasets.teacher: no trace dataset at .*nowhere"):
        load_spec(root / "missing.json")
    import yaml

    (root / "lab.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_spec(root / "lab.yaml").methods[0].label == "SFT"


def test_sigterm_stops_the_running_stage(lab, tmp_path):
    """SIGTERM to the lab stops the training it runs (its process group) before the lab exits;
    the run is left unfinished, not marked done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, spec, _ = lab
    raw = json.loads(spec.read_text())
    raw |= {"methods": {"long": {"flags": ["--dcod-weighting", "sft"]}},
            "train": [*TRAIN, "--train-iters", "100000"], "initial_student_row": False}  # fmt: skip
    (root / "long.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    lab_process = subprocess.Popen(
        [sys.executable, "tools/compare_methods.py", "--spec", str(root / "long.json"),
         "--out", str(out)], cwd=Path(__file__).resolve().parents[3],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = out / "runs" / "long.seed7" / "logs" / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and " iteration " not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.5)
    pid = int(log.read_text().split("[lab] pid ")[1].split()[0])
    lab_process.send_signal(signal.SIGTERM)
    assert lab_process.wait(timeout=150) != 0

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive()  # the training is gone, not orphaned
    assert not (out / "runs" / "long.seed7" / "train.done").exists()
