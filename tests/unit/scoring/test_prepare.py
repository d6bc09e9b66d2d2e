"""What `python -m megatron_dcod.score` refuses before any process group, model or file is
touched (scoring/run.py::prepare), and its command line."""

import json
from pathlib import Path

import pytest

from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer
from megatron_dcod.scoring.arguments import parse_config
from megatron_dcod.scoring.run import prepare
from tests.helpers.models import TOKENIZER_TEXTS, tokenizer_fingerprint
from tests.helpers.scoring import write_untaught_traces
from tests.helpers.traces import save_hf_config, write_synthetic_traces


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An HF config dir with a tokenizer, and a stand-in torch_dist checkpoint dir."""
    root = tmp_path_factory.mktemp("teacher")
    hf_dir = save_hf_config(root / "hf", "llama", vocab=330)
    train_tiny_tokenizer(TOKENIZER_TEXTS, hf_dir, 320)
    release = root / "ckpt" / "release"
    release.mkdir(parents=True)
    (release / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (root / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release")
    return hf_dir, root / "ckpt"


def config(teacher, prefix, *extra):
    hf_dir, checkpoint = teacher
    flags = [f"--hf-config={hf_dir}", f"--load={checkpoint}", f"--data-path={prefix}"]
    return parse_config([*flags, "--seq-length=64", *extra])


def test_an_untaught_dataset_passes(teacher, tmp_path):
    prefix = write_untaught_traces(tmp_path / "traces", tokenizer_fingerprint(teacher[0]), 320)
    prepared = prepare(config(teacher, prefix, "--topk=4"))
    assert len(prepared.jobs) == 1 and prepared.checkpoint_dir.name == "release"
    assert prepared.hf_config.vocab_size == 330


def test_another_tokenizer_is_refused_before_any_work(teacher, tmp_path):
    other = train_tiny_tokenizer(TOKENIZER_TEXTS[:5], tmp_path / "other", 300)
    prefix = write_untaught_traces(tmp_path / "traces", tokenizer_fingerprint(other), 300)
    with pytest.raises(ValueError, match="300 tokens.*has 320 tokens.*share the student's"):
        prepare(config(teacher, prefix))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["other", "traces.meta.json", "traces.sidecar.jsonl"]
        + [f"traces_{a}.{e}" for a in ("tokens", "loss_mask") for e in ("bin", "idx")]
    )


def test_existing_arrays_need_overwrite(teacher, tmp_path):
    fingerprint = tokenizer_fingerprint(teacher[0])
    prefix = write_synthetic_traces(tmp_path / "traces", vocab=320, fingerprint=fingerprint)
    with pytest.raises(FileExistsError, match="already has teacher_logprobs.*--overwrite"):
        prepare(config(teacher, prefix))
    with pytest.raises(FileExistsError, match="already has ref_logprobs"):
        prepare(config(teacher, prefix, "--as=ref"))
    assert prepare(config(teacher, prefix, "--overwrite")).jobs


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seq-length=40"], "trace .* has .* tokens, more than --seq-length 40"),
        (["--tensor-model-parallel-size=3"], "does not divide the 4 attention heads"),
        (["--topk=400"], "--topk 400 exceeds the vocabulary of 330"),
    ],
)
def test_refused_layouts_and_sizes(teacher, tmp_path, extra, message):
    prefix = write_untaught_traces(tmp_path / "traces", tokenizer_fingerprint(teacher[0]), 320)
    with pytest.raises(ValueError, match=message):
        prepare(config(teacher, prefix, *extra))


def test_processes_must_fill_the_layout(teacher, tmp_path, monkeypatch):
    prefix = write_untaught_traces(tmp_path / "traces", tokenizer_fingerprint(teacher[0]), 320)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="3 processes are not a multiple of TP × PP = 2"):
        prepare(config(teacher, prefix, "--tensor-model-parallel-size=2"))


def test_a_model_dir_without_tokenizer(teacher, tmp_path):
    hf_dir = save_hf_config(tmp_path / "bare", "llama", vocab=330)
    prefix = write_untaught_traces(tmp_path / "traces", tokenizer_fingerprint(teacher[0]), 320)
    with pytest.raises(ValueError, match="no tokenizer in .*bare.*--tokenizer"):
        prepare(config((hf_dir, teacher[1]), prefix))
    assert prepare(config((hf_dir, teacher[1]), prefix, f"--tokenizer={teacher[0]}")).jobs


def test_command_line_checks():
    base = ["--hf-config=h", "--load=l", "--data-path=d", "--seq-length=8"]
    assert parse_config([*base, "--bf16"]).dtype == "bf16"
    assert parse_config(base).microbatches() == 1
    assert parse_config([*base, "--pipeline-model-parallel-size=2"]).microbatches() == 8
    for bad in (["--as=ref", "--topk=2"], ["--micro-batch-size=0"], ["--bf16", "--fp16"]):
        with pytest.raises(SystemExit):
            parse_config([*base, *bad])
