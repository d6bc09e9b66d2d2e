#!/usr/bin/env python
"""Teacher-scoring throughput: the Megatron scorer against the HF scorer, and DP=2 against DP=1.

One teacher (a random Llama saved as an HF dir with a tokenizer trained here, and the same
weights imported with `tools/convert_checkpoint.py import-hf`) scores one trace dataset (random
token ids, a short unsupervised prompt then supervised tokens) with top-k, three ways:

  hf      `inference/trace_scorer.py::CausalLMScorer(...).score(traces)` in this process
          (length-sorted, right-padded batches of at most `--batch-tokens` padded tokens; only
          `.score()` is timed, not loading the model);
  dp1     `python -m megatron_dcod.score` at TP=1, one process (traces packed into
          `--seq-length` rows, `--micro-batch-size` rows per forward pass);
  dp2     the same under `torch.distributed.run --nproc_per_node 2` (two data-parallel ranks,
          CPU only: one GPU cannot hold two ranks).

hf and dp1 get all the CPU cores (torch.set_num_threads; OMP_NUM_THREADS); dp2 runs one thread
per process and is compared with dp1_1t, one process of one thread, so that its ratio measures
data parallelism rather than how well one process's threads scale. A Megatron run's figure is the one it logs
on rank 0 ("scored N tokens of 1 dataset(s) in S s (X tokens/s, all ranks)"): scoring, writing the shards and merging
them into the dataset, not start-up or loading the checkpoint (the table shows that start-up,
wall time minus the logged time, apart). tokens/s counts every token of the traces (what both
scorers run forward; the supervised share is printed). Each Megatron run scores a fresh copy of
the dataset. So that the figures are of equal work, each Megatron result is compared with the
HF one: the max abs difference of teacher_logprobs over all tokens is printed, and above 1e-4 in
fp32 the benchmark fails (exit 1, after its JSON line, which then says "equal_to_hf": false).

    python benchmarks/scoring_throughput.py [--device cpu|cuda] [--traces N] [--layers N]
        [--hidden N] [--seq-length N] [--topk 8] [--skip-dp2] [--workdir DIR]

cpu (default): 4 layers x 256 (8 heads, 4 KV heads, FFN 688), the vocabulary of a 1024-id
tokenizer, fp32, 256 traces of 64-512 tokens, --seq-length 1024, top-8, 32-trace shards (8
shards: 4 per DP=2 rank); about 90 s on 2 cores. Goals: dp1 >= 1.0 x hf (all the cores each);
dp2 >= 1.8 x dp1 at one thread per process (dp1_1t).
cuda (a lent GPU; not run where this was written, but every step is the CPU one with the
preset's sizes, `--bf16` for Megatron and dtype="bf16" for HF): a ~1.1B Llama (16 x 2048, 16/8
heads, FFN 5632, vocabulary of a 32000-id tokenizer), bf16, 384 traces of 1024-4096 tokens,
--seq-length 8192, DP=1 and TP=1 only (bf16 differences are printed, not checked). Goal: dp1 >=
1.0 x hf. Last line: JSON with hf/dp1/dp2 tokens_per_s, dp1_over_hf, dp2_over_dp1, the max abs
differences and each goal's verdict.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "cpu": dict(
        layers=4, hidden=256, heads=8, kv_heads=4, ffn=688, tokenizer_vocab=1024, dtype="fp32",
        traces=256, lengths=(64, 512), seq_length=1024, micro_batch=1, shard_traces=32,
    ),
    "cuda": dict(
        layers=16, hidden=2048, heads=16, kv_heads=8, ffn=5632, tokenizer_vocab=32000,
        dtype="bf16", traces=384, lengths=(1024, 4096), seq_length=8192, micro_batch=1,
        shard_traces=48,
    ),
}  # fmt: skip
GOALS = {"dp1_over_hf": 1.0, "dp2_over_dp1": 1.8}
"""dp1 against hf with all the cores each; dp2 against dp1 at the same threads per process
(dp1_1t: one process of one thread), so the ratio is data parallelism's, not threading's."""
FP32_TOLERANCE = 1e-4
LOGGED = re.compile(
    r"scored (\d+) tokens of \d+ dataset\(s\) in ([0-9.]+) s \(([0-9.]+) tokens/s, all ranks\)"
)
TIMEOUT_S = 3600


def tokenizer_texts(vocab: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-words from 180 syllables: enough distinct pairs for a byte-level BPE of
    `vocab` ids (32000 in a few seconds)."""
    rng = np.random.default_rng(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = np.array(
        [c + v for c in consonants for v in vowels] + [v + c for c in consonants for v in vowels]
    )
    lines = []
    for _ in range(max(500, vocab // 4)):
        words = ["".join(rng.choice(syllables, k)) for k in rng.integers(1, 5, 16)]
        lines.append(" ".join(words) + f" {int(rng.integers(0, 10000))}.")
    return lines


def build_teacher(directory: Path, shape: dict, device: str, seq_length: int) -> dict:
    """A random Llama of `shape` and its tokenizer in one HF dir (model vocabulary = the
    tokenizer's size); returns the tokenizer fingerprint the trace dataset must carry."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_dcod.data.chat import ChatTokenizer
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    vocab = shape["tokenizer_vocab"]
    train_tiny_tokenizer(tokenizer_texts(vocab), directory, vocab)
    config = LlamaConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(directory)), hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=seq_length, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model initialises in seconds on the GPU
        model = LlamaForCausalLM(config)
    dtype = torch.bfloat16 if shape["dtype"] == "bf16" else torch.float32
    model.to("cpu", dtype).save_pretrained(directory)
    del model
    return asdict(ChatTokenizer(directory).fingerprint)


def make_traces(count: int, lengths: tuple[int, int], vocab: int) -> list[tuple]:
    """(tokens [T] int32, loss_mask [T] uint8): T uniform in `lengths`, random ids below
    `vocab`, loss mask 0 on a prompt of 8-64 tokens (at most a quarter) and 1 after."""
    rng = np.random.default_rng(0)
    traces = []
    for _ in range(count):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        prompt = int(rng.integers(8, max(9, min(64, length // 4) + 1)))
        loss_mask = (np.arange(length) >= prompt).astype(np.uint8)
        traces.append((rng.integers(0, vocab, length).astype(np.int32), loss_mask))
    return traces


def write_dataset(prefix: Path, traces: list[tuple], fingerprint: dict) -> Path:
    from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter

    with TraceDatasetWriter(prefix, ("tokens", "loss_mask")) as writer:
        for tokens, loss_mask in traces:
            writer.add(Trace(tokens=tokens, loss_mask=loss_mask))
        writer.commit({"tokenizer": fingerprint})
    return prefix


def copy_dataset(prefix: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in prefix.parent.glob(f"{prefix.name}*"):
        shutil.copy(file, out_dir / file.name)
    return out_dir / prefix.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list, what: str, env: dict | None = None) -> tuple[str, float]:
    """(stdout+stderr, wall seconds) of a command; SystemExit with its tail if it fails."""
    started = time.perf_counter()
    result = subprocess.run(
        [str(part) for part in command], cwd=REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{output[-6000:]}")
    return output, time.perf_counter() - started


def score_hf(model_dir: Path, traces: list[tuple], args, cores: int) -> tuple[list, dict]:
    """The HF scorer's results and figures; only `.score()` is timed."""
    import torch

    from megatron_dcod.inference.trace_scorer import CausalLMScorer

    if args.device == "cpu":
        torch.set_num_threads(cores)
    scorer = CausalLMScorer(
        model_dir, device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
        topk=args.topk,
    )  # fmt: skip
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = scorer.score(traces)  # ends with host copies: the GPU work is done
    seconds = time.perf_counter() - started
    tokens = sum(len(tokens) for tokens, _ in traces)
    del scorer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return results, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def score_megatron(args, model_dir: Path, checkpoint: Path, prefix: Path, processes: int,
                   threads: int) -> dict:  # fmt: skip
    """One `python -m megatron_dcod.score` run at TP=1 with `processes` DP ranks; its logged
    figures, wall time and start-up (wall minus the logged time)."""
    flags = [
        f"--hf-config={model_dir}", f"--load={checkpoint}", f"--data-path={prefix}",
        f"--seq-length={args.seq_length}", f"--topk={args.topk}",
        f"--shard-traces={args.shard_traces}", f"--micro-batch-size={args.micro_batch_size}",
        "--tensor-model-parallel-size=1", *(["--bf16"] if args.dtype == "bf16" else []),
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "megatron_dcod.score", *flags]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", "-m", "megatron_dcod.score", *flags,
        ]  # fmt: skip
    env = {"OMP_NUM_THREADS": str(threads), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    output, wall = run(command, f"Megatron scorer, DP={processes}", env)
    match = LOGGED.search(output)
    if not match:
        raise SystemExit(f"DP={processes}: no 'tokens/s, all ranks' line:\n{output[-6000:]}")
    tokens, tokens_per_s = int(match.group(1)), float(match.group(3))
    seconds = tokens / tokens_per_s
    return {
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens_per_s, "wall_s": wall,
        "startup_s": wall - seconds, "threads": threads,
    }  # fmt: skip


def differences(prefix: Path, reference: list) -> dict:
    """Max abs differences of a scored dataset from the HF results: teacher_logprobs over all
    tokens, the float16 top-k log-probs, and the share of top-k ids that differ."""
    from megatron_dcod.data.trace_format import TraceDataset

    dataset = TraceDataset(prefix)
    logprobs = topk_logprobs = 0.0
    ids_differing = ids_total = 0
    for index, expected in enumerate(reference):
        trace = dataset[index]
        logprobs = max(logprobs, float(np.abs(trace.teacher_logprobs - expected.logprobs).max()))
        got, want = (x.astype(np.float32) for x in (trace.teacher_topk_logprobs,
                                                     expected.topk_logprobs))  # fmt: skip
        topk_logprobs = max(topk_logprobs, float(np.abs(got - want).max()))
        ids_differing += int((trace.teacher_topk_ids != expected.topk_ids).sum())
        ids_total += expected.topk_ids.size
    return {
        "logprobs": logprobs,
        "topk_logprobs": topk_logprobs,
        "topk_ids_differing": ids_differing / max(ids_total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=PRESETS, default="cpu")
    parser.add_argument("--traces", type=int, help="(default: the device's preset)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int, help="FFN scaled with it; heads kept")
    parser.add_argument("--seq-length", type=int, help="Megatron's packed row")
    parser.add_argument("--micro-batch-size", type=int, help="Megatron rows per forward pass")
    parser.add_argument("--batch-tokens", type=int, help="HF (default seq x micro-batch)")
    parser.add_argument("--shard-traces", type=int)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--skip-dp2", action="store_true", help="(always, with --device cuda)")
    parser.add_argument("--workdir", type=Path, help="kept (default: a temp dir, removed)")
    args = parser.parse_args()
    shape = dict(PRESETS[args.device])
    if args.hidden:
        ffn = shape["ffn"] * args.hidden / shape["hidden"]
        shape.update(hidden=args.hidden, ffn=max(8, round(ffn / 8) * 8))
    shape["layers"] = args.layers or shape["layers"]
    args.traces = args.traces or shape["traces"]
    args.seq_length = args.seq_length or shape["seq_length"]
    args.micro_batch_size = args.micro_batch_size or shape["micro_batch"]
    args.batch_tokens = args.batch_tokens or args.seq_length * args.micro_batch_size
    args.shard_traces = args.shard_traces or shape["shard_traces"]
    args.dtype = shape["dtype"]
    if shape["hidden"] % shape["heads"] or shape["lengths"][1] > args.seq_length:
        parser.error("--hidden must be a multiple of the heads, --seq-length >= the longest trace")
    dp2 = not args.skip_dp2 and args.device == "cpu"
    cores = len(os.sched_getaffinity(0))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a GPU")
    started = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        figures = benchmark(args, shape, args.workdir, cores, dp2)
    else:
        with tempfile.TemporaryDirectory(prefix="scoring_throughput-") as work:
            figures = benchmark(args, shape, Path(work), cores, dp2)
    report(args, shape, figures, cores, time.perf_counter() - started)


def benchmark(args, shape: dict, work: Path, cores: int, dp2: bool) -> dict:
    model_dir, checkpoint = work / "teacher", work / "teacher-mcore"
    print("building the teacher and importing it ...", file=sys.stderr, flush=True)
    fingerprint = build_teacher(model_dir, shape, args.device, args.seq_length)
    run(
        [sys.executable, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", model_dir,
         "--out", checkpoint, "--dtype", args.dtype],
        "import-hf",
    )  # fmt: skip
    traces = make_traces(args.traces, shape["lengths"], fingerprint["vocab_size"])
    prefix = write_dataset(work / "data" / "traces", traces, fingerprint)
    figures = {
        "supervised": sum(int(m.sum()) for _, m in traces),
        "vocab": fingerprint["vocab_size"],
    }
    print("HF scorer ...", file=sys.stderr, flush=True)
    reference, figures["hf"] = score_hf(model_dir, traces, args, cores)
    variants = {"dp1": (1, cores)}
    if dp2:
        variants |= {"dp1_1t": (1, max(1, cores // 2)), "dp2": (2, max(1, cores // 2))}
    for name, (processes, threads) in variants.items():
        print(f"Megatron scorer, {name} ...", file=sys.stderr, flush=True)
        copy = copy_dataset(prefix, work / name)
        figures[name] = score_megatron(args, model_dir, checkpoint, copy, processes, threads)
        figures[name]["max_abs_diff"] = differences(copy, reference)
    return figures


def report(args, shape: dict, figures: dict, cores: int, wall_s: float) -> None:
    device = torch_device(args.device)
    hf, tokens = figures["hf"], figures["hf"]["tokens"]
    print(
        f"scoring throughput, {args.device} preset ({shape['layers']}x{shape['hidden']}, "
        f"{shape['heads']}/{shape['kv_heads']} heads, FFN {shape['ffn']}, vocab "
        f"{figures['vocab']}, {args.dtype}), {device}, {cores} cores; {args.traces} traces of "
        f"{shape['lengths'][0]}-{shape['lengths'][1]} tokens ({tokens} tokens, "
        f"{figures['supervised'] / tokens:.0%} supervised), top-{args.topk}; HF batch_tokens "
        f"{args.batch_tokens}; Megatron TP=1, seq-length {args.seq_length}, micro-batch "
        f"{args.micro_batch_size}, {args.shard_traces}-trace shards"
    )
    print(f"{'scorer':22} {'threads':>7} {'tokens/s':>9} {'score s':>8} {'start-up s':>10} "
          f"{'x HF':>6} {'max|dlogp|':>11} {'max|dtopk|':>11} {'ids differ':>10}")  # fmt: skip
    print(f"{'HF CausalLMScorer':22} {cores:7d} {hf['tokens_per_s']:9.0f} {hf['seconds']:8.1f} "
          f"{'-':>10} {1:6.2f} {'-':>11} {'-':>11} {'-':>10}")  # fmt: skip
    names = [name for name in ("dp1", "dp1_1t", "dp2") if name in figures]
    for name in names:
        row, diff = figures[name], figures[name]["max_abs_diff"]
        processes = 2 if name == "dp2" else 1
        label = f"Megatron TP=1 DP={processes}"
        print(
            f"{label:22} {row['threads']:>5}x{processes} {row['tokens_per_s']:9.0f} "
            f"{row['seconds']:8.1f} {row['startup_s']:10.1f} "
            f"{row['tokens_per_s'] / hf['tokens_per_s']:6.2f} {diff['logprobs']:11.2e} "
            f"{diff['topk_logprobs']:11.2e} {diff['topk_ids_differing']:10.2%}"
        )
    ratios = {"dp1_over_hf": figures["dp1"]["tokens_per_s"] / hf["tokens_per_s"]}
    if "dp2" in figures:
        ratios["dp2_over_dp1"] = figures["dp2"]["tokens_per_s"] / figures["dp1_1t"]["tokens_per_s"]
    goals = {}
    for key, ratio in ratios.items():
        goals[key] = "pass" if ratio >= GOALS[key] else "FAIL"
        print(f"{key}: {ratio:.3f} (goal >= {GOALS[key]}): {goals[key]}")
    worst = max(figures[name]["max_abs_diff"]["logprobs"] for name in names)
    checked = args.dtype == "fp32"
    equal = worst <= FP32_TOLERANCE if checked else None
    verdict = ("equal" if equal else "NOT EQUAL") if checked else "bf16: not checked"
    print(f"max |teacher_logprobs - HF| {worst:.2e} (fp32 tolerance {FP32_TOLERANCE}): {verdict}")
    print(f"wall time {wall_s:.0f} s")
    result = {
        "benchmark": "scoring_throughput", "device": device, "dtype": args.dtype,
        "layers": shape["layers"], "hidden": shape["hidden"], "vocab": figures["vocab"],
        "traces": args.traces, "tokens": tokens, "topk": args.topk,
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
        "batch_tokens": args.batch_tokens, "cores": cores,
        "tokens_per_s": {"hf": round(hf["tokens_per_s"], 1)}
        | {name: round(figures[name]["tokens_per_s"], 1) for name in names},
        "startup_s": {name: round(figures[name]["startup_s"], 1) for name in names},
        **{key: round(ratio, 4) for key, ratio in ratios.items()},
        "goals": goals,
        "max_abs_diff": {name: figures[name]["max_abs_diff"] for name in names},
        "equal_to_hf": equal, "wall_s": round(wall_s, 1),
    }  # fmt: skip
    print(json.dumps(result))
    if checked and not equal:
        raise SystemExit(
            f"error: the Megatron scorer's teacher_logprobs differ from the HF scorer's by "
            f"{worst:.2e} > {FP32_TOLERANCE}: the throughputs are not of equal work"
        )


def torch_device(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
