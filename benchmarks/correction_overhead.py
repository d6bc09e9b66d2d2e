#!/usr/bin/env python
"""Cost of the DCOD correction over plain SFT: step time, tokens/s, peak memory.

Time: two copies of one student (same init, data and seed) train side by side in one process,
steps interleaved SFT, DCOD, SFT, DCOD, ... so that machine noise hits both alike. Each step is
the training code path: packed batch from the trace dataset → Megatron GPTModel with its fused
vocab-parallel cross-entropy → ForwardStep.loss (the corrected loss) → backward → Adam.
DCOD runs with token scope and the `ce` base loss, so it adds only the weight math on top of
the loss Megatron computes. Memory: each variant alone in a fresh process (`--memory-of`), whose
peak RSS (and peak CUDA allocation on a GPU) is that variant's, not a shared running maximum.

    python benchmarks/correction_overhead.py [--steps 30] [--warmup 5] [--preset tiny|1b]

On a machine without CUDA the CPU mode is applied. Last line: JSON with ratio_median,
sft_tokens_per_s, dcod_tokens_per_s (goal: ratio_median <= 1.03 on CPU, <= 1.01 on GPU).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_dcod.megatron import patches  # noqa: E402

PRESETS = {  # layers, hidden, heads, kv heads, ffn, vocab, seq length, micro-batch
    "tiny": (4, 256, 8, 4, 704, 4096, 512, 4),
    "1b": (16, 2048, 16, 8, 5632, 32000, 2048, 1),
}


def write_traces(prefix: Path, vocab: int, count: int, seed: int = 0) -> Path:
    """Traces of 64–1024 tokens with teacher log-probs (the arrays DCOD reads)."""
    from megatron_dcod.data.trace_format import Trace, TraceDatasetWriter

    rng = np.random.default_rng(seed)
    with TraceDatasetWriter(prefix, ("tokens", "loss_mask", "teacher_logprobs")) as writer:
        for _ in range(count):
            length = int(rng.integers(64, 1024))
            loss_mask = (np.arange(length) >= length // 4).astype(np.uint8)
            writer.add(
                Trace(
                    tokens=rng.integers(0, vocab, length).astype(np.int32),
                    loss_mask=loss_mask,
                    teacher_logprobs=(-rng.exponential(1.0, length) * loss_mask).astype(np.float32),
                )
            )
        fingerprint = dict(name_or_path="bench", vocab_size=vocab, vocab_sha256="0" * 64)
        writer.commit({"tokenizer": dict(fingerprint, chat_template_sha256=None)})
    return prefix


def build_model(preset: str, dtype: torch.dtype):
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from megatron_dcod.models.student import (
        StudentSpec,
        build_student,
        transformer_engine_available,
    )

    layers, hidden, heads, kv_heads, ffn, vocab, seq, _ = PRESETS[preset]
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cpu = not torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=kv_heads, ffn_hidden_size=ffn, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=cpu,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, persist_layer_norm=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )  # fmt: skip
    use_te = not cpu and transformer_engine_available()
    spec = StudentSpec(vocab, seq, False, 10000.0, use_transformer_engine=use_te)
    return build_student(spec, config).to("cuda")


def batches(prefix: Path, preset: str, count: int):
    from megatron.core.datasets.utils import Split

    from megatron_dcod.config import TraceDataConfig
    from megatron_dcod.data.sequences import TraceBlendConfig, TraceSequenceDataset
    from megatron_dcod.data.trace_format import TraceDataset

    *_, seq, micro_batch = PRESETS[preset]
    traces = TraceDataset(prefix)
    data = TraceDataConfig(seq, arrays=("teacher_logprobs",))
    config = TraceBlendConfig(random_seed=1, sequence_length=seq, split="1,0,0", trace=data)
    dataset = TraceSequenceDataset(
        traces, str(prefix), np.arange(len(traces)), count * micro_batch, Split.train, config
    )
    for start in range(0, count * micro_batch, micro_batch):
        rows = [dataset[i] for i in range(start, start + micro_batch)]
        yield {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}


def timed_step(step, model, optimizer, batch) -> float:
    """Seconds of one training step (forward, corrected loss, backward, Adam)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    output, loss_function = step(iter([batch]), model)
    loss, num_tokens, _ = loss_function(output)
    (loss / num_tokens.clamp(min=1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(train_variants(args, (args.memory_of,))[1]))
        return
    times, _ = train_variants(args, VARIANTS)
    memory = {name: peak_memory_of(name, args) for name in VARIANTS}
    report(args, times, memory, tokens_per_step=PRESETS[args.preset][6] * PRESETS[args.preset][7])


VARIANTS = ("sft", "dcod")


def train_variants(args, names) -> tuple[dict, dict]:
    """({variant: timed step seconds}, this process's peak memory) of the named variants,
    trained interleaved from the same init on the same batches."""
    cpu = patches.apply(patches.LIBRARY).cpu
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29761"))
    torch.distributed.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)
    from megatron.core import parallel_state

    from megatron_dcod.config import CorrectionConfig
    from megatron_dcod.training.step import ForwardStep

    parallel_state.initialize_model_parallel()
    dtype = torch.float32 if cpu else torch.bfloat16
    corrections = {
        "sft": CorrectionConfig(weighting="sft"),
        "dcod": CorrectionConfig(weighting="dcod", scope="token"),
    }
    steps = {name: ForwardStep(corrections[name], pack=True) for name in names}
    models = {name: build_model(args.preset, dtype) for name in names}
    optimizers = {name: torch.optim.Adam(models[name].parameters(), lr=1e-4) for name in names}
    times = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as work:
        vocab = PRESETS[args.preset][5]
        prefix = write_traces(Path(work, "traces"), vocab, count=2000)
        for index, batch in enumerate(batches(prefix, args.preset, args.steps + args.warmup)):
            for name, step in steps.items():  # interleaved: same batch, same moment
                seconds = timed_step(step, models[name], optimizers[name], batch)
                if index >= args.warmup:
                    times[name].append(seconds)
    torch.distributed.destroy_process_group()
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if not cpu:
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return times, memory


def peak_memory_of(name: str, args) -> dict:
    """Peak memory of a fresh process that trains only `name` (the same steps)."""
    command = [sys.executable, __file__, "--memory-of", name, "--preset", args.preset]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    environment = {**os.environ, "MASTER_PORT": str(int(os.environ.get("MASTER_PORT", 29761)) + 1)}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args, times, memory, tokens_per_step: int) -> None:
    ratios = [dcod / sft for sft, dcod in zip(times["sft"], times["dcod"])]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"correction overhead, preset {args.preset}, {args.steps} timed steps, {device}")
    print(f"{'variant':8} {'median step s':>14} {'tokens/s':>12} {'peak RSS MB':>12}")
    figures = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        figures[f"{name}_tokens_per_s"] = round(tokens_per_step / median, 1)
        for key, value in memory[name].items():
            figures[f"{name}_{key}"] = round(value)
        rss = memory[name]["peak_rss_mb"]
        print(f"{name:8} {median:14.4f} {tokens_per_step / median:12.1f} {rss:12.0f}")
    ratio = statistics.median(ratios)
    print(f"median step-time ratio dcod/sft: {ratio:.4f} (goal <= 1.03 on CPU, <= 1.01 on GPU)")
    print(
        json.dumps(
            {
                "benchmark": "correction_overhead",
                "preset": args.preset,
                "device": device,
                "ratio_median": round(ratio, 4),
                **figures,
            }
        )
    )


if __name__ == "__main__":
    main()
