#!/usr/bin/env python
"""Step time of the two training engines, and of DCOD over SFT in the DeepSpeed engine.

One student (a random Llama saved as an HF dir with a tokenizer trained here) and one trace
dataset (random tokens with teacher log-probs, packed into sequences of the preset's length)
feed both engines, each under torchrun (`--nproc` processes), with the same flags, init, data
order and seed (their step-1 losses agree):

(a) the Megatron engine, `python -m megatron_dcod.train` (from the student imported with
    `tools/convert_checkpoint.py import-hf`, `--load --finetune`), against the DeepSpeed engine,
    `python -m megatron_dcod.train_hf` (ZeRO `--zero-stage`), both SFT and Adam;
(b) within the DeepSpeed engine, `--dcod-weighting sft` against `--dcod-weighting dcod` (token
    scope, `ce` base loss: the correction's weight math on top of the same loss).

Every run logs every step (`--log-interval 1`); its step times are the "elapsed time per
iteration (ms)" of its steps after `--warmup` (at least 2: Megatron's line of iteration 2
averages iterations 1 and 2). Noise, such as other work on the machine, is spread over the
variants by alternation: each of `--rounds` rounds is one Megatron launch, then one DeepSpeed
launch holding four runs in the order SFT, DCOD, DCOD, SFT (each run is exactly
`python -m megatron_dcod.train_hf ARGV`, one after another in the launch's process group, so
DeepSpeed starts once per launch). A variant's figure is the median of its timed steps pooled
over all its runs; the ratios are ratios of those medians; the median of the DCOD/SFT ratios
of adjacent runs (SFT 1 with DCOD 1, DCOD 2 with SFT 2) is given too. (a)'s DeepSpeed figure is
the SFT variant of (b). tokens/s = global batch × sequence length / median step time.

    python benchmarks/engine_step_time.py [--steps 12] [--warmup 3] [--rounds 2]
        [--zero-stage 2] [--nproc 1] [--preset tiny|1b] [--logs DIR]

tiny: 4 layers × 256 (8 heads, 4 KV heads, FFN 704), the vocabulary of its 2048-id tokenizer,
fp32, 512-token sequences, micro-batch 4: on CPU, about 4 minutes on 2 cores with the defaults.
1b: a ~0.9B Llama (16 × 2048, 16/8 heads, FFN 5632, vocabulary 32000), bf16, 2048-token
sequences, micro-batch 1: for a GPU. Last line: JSON with megatron_ms, deepspeed_ms,
deepspeed_over_megatron, sft_ms, dcod_ms, dcod_over_sft (goal: <= 1.03) and tokens_per_s of
each.
"""

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# layers, hidden, heads, KV heads, FFN, vocabulary (None: the tokenizer's), seq, micro-batch, bf16
PRESETS = {
    "tiny": (4, 256, 8, 4, 704, None, 512, 4, False),
    "1b": (16, 2048, 16, 8, 5632, 32000, 2048, 1, True),
}
TOKENIZER_VOCAB = 2048
STEP_LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|(.*)"
)
RUN_MARKER = re.compile(r"^=== run (\S+) ===$", re.MULTILINE)
LOSS = re.compile(r" lm loss: ([0-9.E+-]+|nan) \|")
TIMEOUT_S = 3600
TOKENS_PER_S_KEYS = {"megatron": "megatron", "deepspeed": "sft", "sft": "sft", "dcod": "dcod"}


def tokenizer_texts(count: int = 3000, seed: int = 0) -> list[str]:
    """Arithmetic sentences: enough distinct text for a byte-level BPE of 2048 ids."""
    rng = np.random.default_rng(seed)
    words = (
        "compute add subtract multiply the answer is step first then so we get total reason "
        "check carry result value sum product difference"
    ).split()
    texts = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(0, 1000, 2))
        prose = " ".join(rng.choice(words, 8)).capitalize()
        texts.append(f"Compute {a} + {b}. {prose}: {a} + {b} = {a + b}. \\boxed{{{a + b}}}.")
    return texts


def build_student(directory: Path, preset: str) -> tuple[int, dict]:
    """A random Llama of the preset and a tiny tokenizer in one HF dir; (model vocabulary,
    the tokenizer fingerprint trace datasets must carry)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_dcod.data.chat import ChatTokenizer
    from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer

    layers, hidden, heads, kv_heads, ffn, vocab, seq, _, bf16 = PRESETS[preset]
    train_tiny_tokenizer(tokenizer_texts(), directory, TOKENIZER_VOCAB)
    vocab = vocab or len(AutoTokenizer.from_pretrained(directory))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if bf16 else torch.float32).save_pretrained(directory)
    return vocab, asdict(ChatTokenizer(directory).fingerprint)


def write_traces(prefix: Path, token_vocab: int, count: int, seq: int, fingerprint: dict) -> Path:
    """`count` random traces of 32 to `seq` tokens (prompt: the first quarter) with teacher
    log-probs, stamped with the student's tokenizer fingerprint."""
    from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter

    rng = np.random.default_rng(0)
    with TraceDatasetWriter(prefix, ("tokens", "loss_mask", "teacher_logprobs")) as writer:
        for _ in range(count):
            length = int(rng.integers(32, seq + 1))
            loss_mask = (np.arange(length) >= length // 4).astype(np.uint8)
            writer.add(
                Trace(
                    tokens=rng.integers(0, token_vocab, length).astype(np.int32),
                    loss_mask=loss_mask,
                    teacher_logprobs=(-rng.exponential(1.0, length) * loss_mask).astype(np.float32),
                )
            )
        writer.commit({"tokenizer": fingerprint})
    return prefix


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], what: str, env: dict | None = None) -> str:
    """stdout+stderr of a command; SystemExit with its tail if it fails."""
    result = subprocess.run(
        [str(part) for part in command], cwd=REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{output[-6000:]}")
    return output


def common_flags(args, prefix: Path) -> list[str]:
    """Flags both engines share (Megatron's names and meanings)."""
    *_, seq, micro, bf16 = PRESETS[args.preset]
    return [
        f"--data-path={prefix}", "--split=100,0,0", f"--seq-length={seq}",
        f"--micro-batch-size={micro}", f"--global-batch-size={micro * args.nproc}",
        f"--train-iters={args.steps}", "--optimizer=adam", "--lr=1e-4",
        "--lr-decay-style=constant", "--weight-decay=0.01", "--clip-grad=1.0", "--seed=1234",
        "--log-interval=1", "--eval-interval=100000", "--eval-iters=0", "--num-workers=1",
        *(["--bf16"] if bf16 else []),
    ]  # fmt: skip


def torchrun(args, target: list[str], what: str) -> str:
    """Output of `torchrun --nproc_per_node N TARGET...` (a module: ["-m", name, ...])."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        f"--master_port={free_port()}", *target,
    ]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 1) // args.nproc))
    return run(command, what, {"OMP_NUM_THREADS": threads, "CUDA_DEVICE_MAX_CONNECTIONS": "1"})


def step_times(output: str, warmup: int, what: str) -> dict:
    """{"ms": [...], "printed_tokens_per_s": [...], "first_loss": ...}: the steps after
    `warmup` of a run's log, and its first step's lm loss."""
    steps = {int(it): (float(ms), rest) for it, ms, rest in STEP_LINE.findall(output)}
    timed = [steps[it] for it in sorted(steps) if it > warmup]
    if not timed:
        raise SystemExit(f"{what}: no logged step after warm-up:\n{output[-6000:]}")
    printed = [re.search(r"tokens/s: ([0-9.]+)", rest) for _, rest in timed]
    first = LOSS.search(" |" + steps[min(steps)][1])
    return {
        "ms": [ms for ms, _ in timed],
        "printed_tokens_per_s": [float(match.group(1)) for match in printed if match],
        "first_loss": float(first.group(1)) if first else math.nan,
    }


def deepspeed_runs(runs_file: str) -> None:
    """Child mode, under torchrun: the DeepSpeed engine's runs of RUNS_FILE ([[name, argv],
    ...]) one after another in one process group, each `python -m megatron_dcod.train_hf ARGV`
    exactly; rank 0 prints `=== run NAME ===` before each run's log."""

    import gc

    import torch
    import torch.distributed as dist

    from megatron_dcod.engines.deepspeed_setup import init_distributed
    from megatron_dcod.train_hf import main as train_hf

    init_distributed()
    for name, argv in json.loads(Path(runs_file).read_text()):
        if dist.get_rank() == 0:
            print(f"=== run {name} ===", flush=True)
        train_hf(argv)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (--train-iters)")
    parser.add_argument(
        "--warmup", type=int, default=3,
        help="untimed first steps per run (at least 2: Megatron's line of iteration 2 averages "
        "iterations 1 and 2, as it does not reset its interval after the first)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the run order")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes per launch")
    parser.add_argument("--logs", type=Path, help="dir to keep each launch's log in")
    parser.add_argument("--deepspeed-runs", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.deepspeed_runs:
        deepspeed_runs(args.deepspeed_runs)
        return
    if args.warmup < 2 or args.steps <= args.warmup:
        parser.error("need 2 <= --warmup < --steps")
    started = time.perf_counter()
    *_, seq, micro, bf16 = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="engine_step_time-") as work:
        model, prefix, init = Path(work, "student"), Path(work, "traces"), Path(work, "init")
        vocab, fingerprint = build_student(model, args.preset)
        tokens = 2 * args.steps * micro * args.nproc * seq  # twice what a run reads
        write_traces(prefix, fingerprint["vocab_size"], tokens // ((32 + seq) // 2) + 64, seq,
                     fingerprint)  # fmt: skip
        run(
            [sys.executable, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", model,
             "--out", init, "--dtype", "bf16" if bf16 else "fp32"],
            "import-hf",
        )  # fmt: skip
        flags = common_flags(args, prefix)
        megatron = [
            "-m", "megatron_dcod.train", f"--hf-config={model}", f"--dcod-tokenizer={model}",
            *flags, "--make-vocab-size-divisible-by=128", "--ckpt-format=torch_dist",
            f"--load={init}", "--finetune", "--dcod-weighting=sft",
        ]  # fmt: skip
        deepspeed = [f"--hf-model={model}", *flags, f"--zero-stage={args.zero_stage}"]
        runs = {name: [] for name in ("megatron", "sft", "dcod")}
        for index in range(args.rounds):
            what = f"round {index + 1}/{args.rounds}: Megatron"
            log = progress_and_run(args, megatron, what, f"megatron-{index + 1}")
            runs["megatron"].append(step_times(log, args.warmup, what))
            order = [("sft", 1), ("dcod", 1), ("dcod", 2), ("sft", 2)]  # A B B A
            runs_file = Path(work, f"deepspeed-{index + 1}.json")
            runs_file.write_text(json.dumps([
                (f"{name}-{pair}", [*deepspeed, f"--dcod-weighting={name}"])
                for name, pair in order
            ]))  # fmt: skip
            what = f"round {index + 1}/{args.rounds}: DeepSpeed SFT, DCOD, DCOD, SFT"
            target = [__file__, "--deepspeed-runs", str(runs_file)]
            log = progress_and_run(args, target, what, f"deepspeed-{index + 1}")
            pieces = RUN_MARKER.split(log)
            logs = {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}
            for name, pair in order:
                if f"{name}-{pair}" not in logs:
                    raise SystemExit(f"{what}: no log of run {name}-{pair}:\n{log[-6000:]}")
                run_log = logs[f"{name}-{pair}"]
                runs[name].append(step_times(run_log, args.warmup, f"{what}, {name} {pair}"))
    report(args, runs, vocab, time.perf_counter() - started)


def progress_and_run(args, target: list[str], what: str, log_name: str) -> str:
    print(f"{what} ...", file=sys.stderr, flush=True)
    output = torchrun(args, target, what)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        Path(args.logs, f"{log_name}.log").write_text(output)
    return output


def report(args, runs: dict, vocab: int, wall_s: float) -> None:
    layers, hidden, heads, kv_heads, ffn, _, seq, micro, bf16 = PRESETS[args.preset]
    tokens_per_step = micro * args.nproc * seq
    medians = {
        name: statistics.median([ms for r in rs for ms in r["ms"]]) for name, rs in runs.items()
    }
    run_medians = {name: [statistics.median(r["ms"]) for r in rs] for name, rs in runs.items()}
    device = torch_device()
    print(
        f"engine step time, preset {args.preset} ({layers}x{hidden}, {heads}/{kv_heads} heads, "
        f"FFN {ffn}, vocab {vocab}, {'bf16' if bf16 else 'fp32'}), {seq}-token packed sequences, "
        f"global batch {micro * args.nproc} (micro {micro} x {args.nproc} proc), DeepSpeed "
        f"ZeRO-{args.zero_stage}, {device}; {args.rounds} rounds, {args.steps - args.warmup} "
        f"timed steps per run after {args.warmup} warm-up"
    )
    labels = {"megatron": "Megatron SFT", "sft": "DeepSpeed SFT", "dcod": "DeepSpeed DCOD"}
    print(f"{'engine, variant':15} {'runs':>4} {'median ms':>10} {'tokens/s':>9} "
          f"{'step-1 loss':>12}  median ms of each run")  # fmt: skip
    for name, rs in runs.items():
        each = " ".join(f"{ms:.0f}" for ms in run_medians[name])
        print(
            f"{labels[name]:15} {len(rs):4d} {medians[name]:10.1f} "
            f"{1000 * tokens_per_step / medians[name]:9.1f} {rs[0]['first_loss']:12.6f}  {each}"
        )
    ds_over_megatron = medians["sft"] / medians["megatron"]
    dcod_over_sft = medians["dcod"] / medians["sft"]
    pairs = [dcod / sft for sft, dcod in zip(run_medians["sft"], run_medians["dcod"])]
    print(f"(a) DeepSpeed / Megatron step time (SFT): {ds_over_megatron:.4f}")
    print(
        f"(b) DCOD / SFT step time (DeepSpeed): {dcod_over_sft:.4f} (goal <= 1.03); "
        f"adjacent pairs: {', '.join(f'{ratio:.4f}' for ratio in pairs)} "
        f"(median {statistics.median(pairs):.4f})"
    )
    printed = [t for r in runs["sft"] for t in r["printed_tokens_per_s"]]
    if printed:
        print(f"DeepSpeed SFT's own tokens/s lines: median {statistics.median(printed):.1f}")
    print(f"wall time {wall_s:.0f} s")
    figures = {
        "megatron_ms": round(medians["megatron"], 1),
        "deepspeed_ms": round(medians["sft"], 1),
        "deepspeed_over_megatron": round(ds_over_megatron, 4),
        "sft_ms": round(medians["sft"], 1),
        "dcod_ms": round(medians["dcod"], 1),
        "dcod_over_sft": round(dcod_over_sft, 4),
        "dcod_over_sft_pair_median": round(statistics.median(pairs), 4),
        "tokens_per_s": {
            name: round(1000 * tokens_per_step / medians[variant], 1)
            for name, variant in TOKENS_PER_S_KEYS.items()
        },
    }
    setting = {
        "benchmark": "engine_step_time", "preset": args.preset, "device": device,
        "zero_stage": args.zero_stage, "nproc": args.nproc, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds,
    }  # fmt: skip
    print(json.dumps({**setting, **figures}))


def torch_device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
