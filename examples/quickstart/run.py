#!/usr/bin/env python
"""The CPU quickstart (`make quickstart`): bundled example traces → a trace dataset → inspection.

Steps (each prints the command a user would type):
  1. train a tiny byte-level BPE tokenizer on the example traces (no downloads);
  2. make a tiny Llama-family "teacher" (random weights for now: a stand-in until the
     quickstart trains one) and save it as an HF model dir;
  3. tools/preprocess_traces.py: chat template, loss mask, teacher log-probs and top-4 scored
     by that model, 2 tokenizer workers;
  4. tools/inspect_traces.py: dataset statistics and the first trace as aligned columns;
  5. train the tiny student preset (examples/presets/tiny-llama) with DCOD weights on 2 CPU
     processes at TP=2 (`torchrun ... -m megatron_dcod.train`), checkpoint, then resume it for
     more steps from that checkpoint.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402

TRACES = Path(__file__).with_name("traces.jsonl")


def run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def make_teacher(tokenizer_dir: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    args = parser.parse_args()
    out = args.out.resolve()
    records = [json.loads(line) for line in TRACES.read_text().splitlines()]

    print(f"[1/5] tokenizer: byte-level BPE trained on {len(records)} example traces")
    tokenizer_dir = out / "tokenizer"
    train_tiny_tokenizer((r["prompt"] + "\n" + r["response"] for r in records), tokenizer_dir)

    print("[2/5] teacher: a tiny random Llama-family HF model (stand-in)")
    teacher_dir = out / "teacher"
    make_teacher(tokenizer_dir, teacher_dir)

    print("[3/5] preprocess the traces")
    prefix = out / "data" / "traces"
    run(
        [
            sys.executable,
            "tools/preprocess_traces.py",
            "--input",
            str(TRACES),
            "--output-prefix",
            str(prefix),
            "--tokenizer",
            str(tokenizer_dir),
            "--score-with",
            str(teacher_dir),
            "--score-topk",
            "4",
            "--workers",
            "2",
            "--max-seq-length",
            "256",
            "--overwrite",
        ]
    )

    print("\n[4/5] inspect the dataset")
    run([sys.executable, "tools/inspect_traces.py", str(prefix), "--index", "0"])

    print("\n[5/5] train the student (DCOD, TP=2 on 2 CPU processes), then resume it")
    checkpoints = out / "checkpoints"
    run(train_command(prefix, tokenizer_dir, checkpoints) + ["--exit-interval", "20"])
    run(train_command(prefix, tokenizer_dir, checkpoints))  # loads iteration 20, trains to 30


def train_command(prefix: Path, tokenizer_dir: Path, checkpoints: Path) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "-m", "megatron_dcod.train",
        "--hf-config", str(ROOT / "examples" / "presets" / "tiny-llama"),
        "--dcod-tokenizer", str(tokenizer_dir),
        "--data-path", str(prefix), "--split", "90,10,0",
        "--tensor-model-parallel-size", "2",
        "--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "30", "--lr", "1e-3", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2", "--min-lr", "1e-4", "--weight-decay", "0.01",
        "--dcod-weighting", "dcod", "--dcod-scope", "token",
        "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2",
        "--save", str(checkpoints), "--load", str(checkpoints), "--save-interval", "10",
        "--ckpt-format", "torch_dist", "--tensorboard-dir", str(checkpoints.parent / "tensorboard"),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
