"""tools/synthesize_traces.py → tools/preprocess_traces.py --score-with → training, end to end:
MOTAB records become a dataset with the per-token source, and a DCOD run logs the loss and
weight of each source."""

import json
import shutil
import sys

import numpy as np
import pytest

from megatron_dcod.data.trace_format import TraceDataset
from tests.helpers.models import save_tiny_llama
from tests.helpers.training import REPO, logged_weight_metrics, tiny_run_flags, train
from tests.unit.conftest import write_jsonl

sys.path.insert(0, str(REPO / "tools"))

import preprocess_traces  # noqa: E402
import synthesize_traces  # noqa: E402


@pytest.fixture
def student_dir(tmp_path, chat_tokenizer, tokenizer_dir):
    save_tiny_llama(tmp_path / "student", len(chat_tokenizer.tokenizer), seed=4, init_std=0.3)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, tmp_path / "student")
    return tmp_path / "student"


def test_motab_traces_train_with_per_source_metrics(tmp_path, tiny_model_dir, student_dir, capsys):
    questions = ["Compute 12 + 7.", "What is 3 * 4?", "Add 7", "Let us think"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"problem": q} for q in questions])
    out = tmp_path / "motab.jsonl"
    synthesize = ["--method", "motab", "--prompts", str(prompts), "--teacher", str(tiny_model_dir),
                  "--student", str(student_dir), "--out", str(out), "--dtype", "fp32",
                  "--responses-per-prompt", "2", "--max-step-tokens", "8", "--max-tokens", "24",
                  "--step-stop", "e", "--epsilon0", "0.045"]  # fmt: skip
    assert synthesize_traces.main(synthesize) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trajectories"] == 8 and 0 < summary["breach_rate"] < 1
    assert synthesize_traces.main(synthesize) == 0  # a finished run is left as it is
    records = [json.loads(line) for line in open(out)]
    assert len(records) == 8 and records[0]["problem"] == questions[0]
    prefix = tmp_path / "data" / "motab"
    assert preprocess_traces.main([
        "--input", str(out), "--output-prefix", str(prefix), "--tokenizer", str(student_dir),
        "--score-with", str(tiny_model_dir), "--workers", "1",
    ]) == 0  # fmt: skip
    dataset = TraceDataset(prefix)
    sources = np.concatenate([dataset[i].source[dataset[i].loss_mask == 1] for i in range(8)])
    assert set(np.unique(sources)) == {1, 2, 3}  # student, teacher and the inserted connector
    output = train(
        *tiny_run_flags(student_dir, prefix, iters=5), "--dcod-weighting=dcod",
        "--micro-batch-size=2", "--global-batch-size=2", "--seq-length=64",
    )  # fmt: skip
    logged = logged_weight_metrics(output)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    for source in ("student", "teacher", "inserted"):  # NaN in a step without the source
        losses = np.array([metrics[f"base loss {source}"] for metrics in logged.values()])
        weights = np.array([metrics[f"w mean {source}"] for metrics in logged.values()])
        assert np.isfinite(losses).any() and (losses[np.isfinite(losses)] > 0).all()
        assert np.array_equal(np.isfinite(weights), np.isfinite(losses))
        assert (weights[np.isfinite(weights)] > 0).all()
