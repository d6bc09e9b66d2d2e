#!/usr/bin/env python
"""MOTAB synthesis throughput: step-synchronous batching vs one trajectory at a time.

Both runs make the same trajectories (the per-trajectory seeds make them identical; the script
checks it) from random tiny Llama models sharing a byte-level tokenizer: `--trajectories`
prompts with one response each. The batched run advances `--live` of them together (one student
generate and one teacher score per round, refilled from the prompts as trajectories finish);
the sequential run has the structure of the MOTAB authors' loop: one trajectory at a time, one
request per step and one per score.

    python benchmarks/synthesis_throughput.py [--trajectories 64 --live 16] [--device cpu] \
        [--student-hidden 32 --teacher-hidden 64 --layers 2]

On a GPU, models of the issue's sizes (random weights; ~0.5B student, ~1.5B-shaped teacher, with
this tiny vocabulary):

    python benchmarks/synthesis_throughput.py --device cuda --dtype bf16 \
        --student-hidden 1024 --teacher-hidden 1536 --layers 24 --trajectories 64 --live 64 \
        --max-step-tokens 128 --max-tokens 1024

Last line: JSON (trajectories_per_s, sequential_trajectories_per_s, speedup, breach_rate, ...).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megatron_dcod.data.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402
from megatron_dcod.synthesis.cli import unescaped  # noqa: E402
from megatron_dcod.synthesis.config import SynthesisConfig  # noqa: E402
from megatron_dcod.synthesis.run import synthesize  # noqa: E402

TEXTS = ["Compute 12 + 7. Step one.\n\nAdd 7: 12 + 7 = 19.\n\nThe answer is \\boxed{19}."] * 50


def save_model(directory: Path, tokenizer: Path, vocab: int, hidden: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        max_position_embeddings=2048,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    for file in tokenizer.iterdir():
        shutil.copy(file, directory)


def timed_run(work: Path, name: str, args, live: int) -> tuple[float, dict, list]:
    config = SynthesisConfig(
        method="motab", prompts=(str(work / "prompts.jsonl"),), teacher=str(work / "teacher"),
        student=str(work / "student"), out=str(work / f"{name}.jsonl"), responses_per_prompt=1,
        max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
        step_stop=tuple(args.step_stop),
        epsilon0=args.epsilon0, temperature=0.6, dtype=args.dtype, device=args.device,
        max_live_trajectories=live, batch_size=live,
    )  # fmt: skip
    summary = synthesize(config)  # its `seconds` leave out model loading
    return summary["seconds"], summary, [json.loads(line) for line in open(config.out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=64, help="prompts, one response each")
    parser.add_argument("--live", type=int, default=16, help="trajectories advanced together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--student-hidden", type=int, default=32)
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-step-tokens", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--step-stop", nargs="+", default=["e"], type=unescaped)
    parser.add_argument("--epsilon0", type=float, default=0.06, help="0.06: about half breach")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="synth_tput_")))
    args = parser.parse_args()
    work = args.work
    tokenizer = train_tiny_tokenizer(TEXTS, work / "tokenizer", 320)
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    save_model(work / "student", tokenizer, vocab, args.student_hidden, args.layers, seed=1)
    save_model(work / "teacher", tokenizer, vocab, args.teacher_hidden, args.layers, seed=2)
    with open(work / "prompts.jsonl", "w") as prompts:
        for i in range(args.trajectories):
            prompts.write(json.dumps({"question": f"Compute {i} + {2 * i + 1}."}) + "\n")
    batched_s, summary, batched = timed_run(work, "batched", args, args.live)
    sequential_s, _, sequential = timed_run(work, "sequential", args, 1)
    same = [r["response"] for r in batched] == [r["response"] for r in sequential]
    tokens = sum(summary["generated_tokens_by_source"].values())
    result = {
        "trajectories": args.trajectories,
        "live_trajectories": args.live,
        "trajectories_per_s": args.trajectories / batched_s,
        "sequential_trajectories_per_s": args.trajectories / sequential_s,
        "speedup": sequential_s / batched_s,
        "generated_tokens_per_s": tokens / batched_s,
        "sequential_generated_tokens_per_s": tokens / sequential_s,
        "breach_rate": summary["breach_rate"],
        "identical_outputs": same,
        "device": args.device,
        "dtype": args.dtype,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
