"""`python -m megatron_dcod.score` against the HF scorer (`inference/trace_scorer.py`, plain
transformers), on tiny models of the four families at TP=1, TP=2 and PP=2; resume after a kill;
and a DCOD training run that reads the same weights from a dataset scored either way.

The teachers' vocabulary (330 rows) is larger than their tokenizer (320 ids), and Megatron pads
it further (352 rows at TP=1, 384 at TP=2): log-probs must be over the HF rows only."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_dcod.data.trace_format import TraceDataset, TraceDatasetWriter
from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer
from megatron_dcod.inference.trace_scorer import CausalLMScorer
from megatron_dcod.scoring.arguments import parse_config
from megatron_dcod.scoring.run import prepare
from tests.helpers.distributed import free_port, run_distributed_test
from tests.helpers.models import TOKENIZER_TEXTS, save_tiny_family_model, tokenizer_fingerprint
from tests.helpers.scoring import KILL_AFTER_SHARD, score_each, write_untaught_traces
from tests.helpers.training import REPO, logged_weight_metrics, tiny_run_flags, train

FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},  # q/k norms, tied
}
TOKENIZER_IDS, MODEL_VOCAB, TOPK = 320, 330, 4
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2)}  # TP, PP, processes


def import_all(cases: list) -> None:
    from megatron_dcod.checkpoint.import_hf import import_hf
    from megatron_dcod.config import ImportConfig

    for hf_dir, out in cases:
        import_hf(
            ImportConfig(Path(hf_dir), Path(out), dtype="fp32", make_vocab_size_divisible_by=32)
        )


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """{family: (HF dir with tokenizer, imported Megatron checkpoint)} and an untaught dataset."""
    root = tmp_path_factory.mktemp("score")
    tokenizer = train_tiny_tokenizer(TOKENIZER_TEXTS, root / "tokenizer", TOKENIZER_IDS)
    dirs = {}
    for family, overrides in FAMILIES.items():
        hf_dir = save_tiny_family_model(
            root / f"hf-{family}", family, vocab_size=MODEL_VOCAB, **overrides
        )
        for file in tokenizer.iterdir():
            shutil.copy(file, hf_dir)
        dirs[family] = (hf_dir, root / f"mg-{family}")
    run_distributed_test(
        import_all, world_size=1, cases=[(str(h), str(m)) for h, m in dirs.values()]
    )
    dataset = write_untaught_traces(
        root / "untaught" / "traces", tokenizer_fingerprint(tokenizer), TOKENIZER_IDS
    )
    return dirs, dataset


def copy_dataset(prefix: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in prefix.parent.glob(f"{prefix.name}*"):
        shutil.copy(file, out_dir / file.name)
    return out_dir / prefix.name


def score_flags(hf_dir, checkpoint, prefix, *extra) -> list[str]:
    """Flags scoring `prefix`; a later `--data-path=P` in `extra` adds dataset P (argparse
    keeps the last value of a repeated flag, so extra paths are merged into one flag)."""
    paths = [str(prefix)] + [
        flag.split("=", 1)[1] for flag in extra if flag.startswith("--data-path=")
    ]
    extra = [flag for flag in extra if not flag.startswith("--data-path=")]
    return [
        f"--hf-config={hf_dir}", f"--load={checkpoint}", "--data-path", *paths,
        "--seq-length=64", f"--topk={TOPK}", "--shard-traces=8", "--micro-batch-size=2", *extra,
    ]  # fmt: skip


def hf_scores(hf_dir, prefix):
    dataset = TraceDataset(prefix)
    traces = [(dataset[i].tokens, dataset[i].loss_mask) for i in range(len(dataset))]
    return CausalLMScorer(hf_dir, topk=TOPK).score(traces)


def assert_equals_hf(prefix: Path, reference) -> None:
    """fp32 log-probs within 1e-5; top-k ids equal where the HF top-k is not (nearly) tied;
    float16 top-k log-probs within float16 rounding."""
    dataset = TraceDataset(prefix)
    assert dataset.meta["teacher_logprobs_from"] == "model" and dataset.topk == TOPK
    for index, expected in enumerate(reference):
        trace = dataset[index]
        np.testing.assert_allclose(trace.teacher_logprobs, expected.logprobs, rtol=0, atol=1e-5)
        values = expected.topk_logprobs.astype(np.float32)  # [T, k]
        gaps = np.diff(values, axis=1, prepend=np.inf, append=-np.inf)  # [T, k+1]
        clear = (np.abs(gaps[:, :-1]) > 1e-3) & (np.abs(gaps[:, 1:]) > 1e-3)  # [T, k]
        assert np.array_equal(trace.teacher_topk_ids[clear], expected.topk_ids[clear]), index
        np.testing.assert_allclose(
            trace.teacher_topk_logprobs.astype(np.float32), values, rtol=2**-10, atol=1e-6
        )


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_megatron_scorer_equals_hf_scorer(teachers, tmp_path, layout):
    """Each family's teacher scores a copy of the dataset (llama: two copies in one run); at
    PP=2 one micro-batch per schedule call, so a shard takes several calls."""
    dirs, untaught = teachers
    tp, pp, processes = LAYOUTS[layout]
    parallel = [f"--tensor-model-parallel-size={tp}", f"--pipeline-model-parallel-size={pp}"]
    parallel += ["--pipeline-microbatches=1"] if pp > 1 else []
    runs, prefixes = [], {}
    for family, (hf_dir, checkpoint) in dirs.items():
        prefixes[family] = [copy_dataset(untaught, tmp_path / family)]
        if family == "llama":
            prefixes[family].append(copy_dataset(untaught, tmp_path / "llama-second"))
        second = [f"--data-path={prefix}" for prefix in prefixes[family][1:]]
        runs.append(score_flags(hf_dir, checkpoint, prefixes[family][0], *parallel, *second))
    run_distributed_test(score_each, world_size=processes, runs=runs)
    for family, (hf_dir, _) in dirs.items():
        reference = hf_scores(hf_dir, untaught)
        for prefix in prefixes[family]:
            assert_equals_hf(prefix, reference)
            assert not list(prefix.parent.glob(".*")), "work dir or temporary files left"


def run_scorer(flags: list[str], processes: int, env: dict | None = None):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    launcher += [f"--master_port={free_port()}"]
    command = [*launcher, "-m", "tests.helpers.scoring", *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


def saved_shards(output: str) -> set[int]:
    return {int(index) for index in re.findall(r"saved shard (\d+)", output)}


def test_killed_scorer_resumes_where_it_stopped(teachers, tmp_path):
    """SIGKILL right after shard 1 is saved (one process): the dataset is as it was; the rerun,
    on two data-parallel ranks, scores only the other shards, and the result is the HF one."""
    dirs, untaught = teachers
    hf_dir, checkpoint = dirs["llama"]
    prefix = copy_dataset(untaught, tmp_path / "data")
    meta_before = Path(f"{prefix}.meta.json").read_text()
    flags = score_flags(hf_dir, checkpoint, prefix)
    killed = subprocess.run(
        [sys.executable, "-m", "tests.helpers.scoring", *flags], cwd=REPO,
        env={**os.environ, KILL_AFTER_SHARD: "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert saved_shards(killed.stdout) == {0, 1}
    assert Path(f"{prefix}.meta.json").read_text() == meta_before
    assert not list(prefix.parent.glob("traces_teacher*")), "arrays put in before the merge"
    work = list(prefix.parent.glob(".traces.score-teacher-*"))
    assert len(work) == 1 and sorted(p.name for p in work[0].iterdir()) == [
        "shard-000000.npz",
        "shard-000001.npz",
    ]
    resumed = run_scorer(flags, processes=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    assert saved_shards(resumed.stdout) == {2, 3, 4}  # 40 traces, 8 per shard
    assert "resuming, 2 of 5 shards done" in resumed.stderr
    assert_equals_hf(prefix, hf_scores(hf_dir, untaught))
    assert not work[0].exists()
    assert prepare(parse_config(flags)).jobs == []  # the same command after success: a no-op


def write_hf_scored(untaught: Path, hf_dir: Path, out: Path) -> Path:
    """The dataset with the HF scorer's teacher log-probs, written by the dataset writer."""
    dataset = TraceDataset(untaught)
    scored = hf_scores(hf_dir, untaught)
    arrays = (
        "tokens",
        "loss_mask",
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
    )
    with TraceDatasetWriter(out, arrays, topk=TOPK) as writer:
        for index, result in enumerate(scored):
            trace = dataset[index]
            trace.teacher_logprobs, trace.teacher_topk_ids = result.logprobs, result.topk_ids
            trace.teacher_topk_logprobs = result.topk_logprobs
            writer.add(trace)
        writer.commit({"tokenizer": dataset.meta["tokenizer"]})
    return out


def test_dcod_training_reads_the_same_weights_either_way(teachers, tmp_path):
    dirs, untaught = teachers
    hf_dir, checkpoint = dirs["qwen2"]
    megatron_scored = copy_dataset(untaught, tmp_path / "megatron")
    run_distributed_test(
        score_each, world_size=1, runs=[score_flags(hf_dir, checkpoint, megatron_scored)]
    )
    hf_scored = write_hf_scored(untaught, hf_dir, tmp_path / "hf" / "traces")
    weights = []
    for prefix in (hf_scored, megatron_scored):
        flags = tiny_run_flags(hf_dir, prefix, iters=2) + [
            "--micro-batch-size=2",
            "--global-batch-size=4",
        ]
        output = train(*flags, "--dcod-weighting=dcod", "--dcod-scope=prefix")
        weights.append(logged_weight_metrics(output))
    assert set(weights[0]) == set(weights[1]) == {1, 2}
    for iteration, line in weights[0].items():  # printed to 7 digits; log-probs agree to 1e-6
        assert weights[1][iteration] == pytest.approx(line, rel=1e-5, abs=1e-7), iteration
