#!/usr/bin/env python
"""Peak memory of checkpoint conversion relative to the checkpoint's size on disk.

Writes a randomly initialised Llama-family HF checkpoint of about 1 GB (bf16, 250 MB shards),
then runs `tools/convert_checkpoint.py import-hf` and `export-hf` under `/usr/bin/time -v` and
divides each one's maximum resident set size by the size on disk of the checkpoint it reads.

    python benchmarks/convert_memory.py [--layers 32] [--hidden 1024] [--work DIR]

Goal: both ratios <= 1.25. Last line: JSON with export_peak_rss_ratio, import_peak_rss_ratio.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_checkpoint.py"


def write_random_llama(directory: Path, layers: int, hidden: int) -> None:
    """config.json + bf16 safetensors shards written tensor by tensor (never the whole model)."""
    from transformers import LlamaConfig

    from megatron_dcod.checkpoint.hf_files import (
        PlannedTensor,
        StreamingSafetensorsWriter,
        expected_hf_shapes,
        plan_shards,
        shard_file_names,
        write_index,
    )

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    plan = [PlannedTensor(n, s, torch.bfloat16) for n, s in expected_hf_shapes(config).items()]
    shards = plan_shards(plan, 250 * 10**6)
    files = shard_file_names(len(shards))
    generator = torch.Generator().manual_seed(0)
    for file, shard in zip(files, shards):
        writer = StreamingSafetensorsWriter(directory / file, shard)
        for tensor in shard:
            values = torch.randn(tensor.shape, generator=generator) * 0.02
            writer.write(tensor.name, values.to(torch.bfloat16))
        writer.close()
    write_index(directory, shards, files)


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def peak_rss_bytes(*argv: str) -> tuple[int, float]:
    """Maximum RSS (bytes) and wall time of `convert_checkpoint.py argv` under /usr/bin/time."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, str(TOOL), *argv],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{result.stderr[-4000:]}")
    kilobytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return int(kilobytes.group(1)) * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temporary one)")
    options = parser.parse_args()
    work = options.work or Path(tempfile.mkdtemp(prefix="convert_memory_"))
    shutil.rmtree(work / "hf", ignore_errors=True)
    for name in ("megatron", "exported"):
        shutil.rmtree(work / name, ignore_errors=True)
    write_random_llama(work / "hf", options.layers, options.hidden)
    hf_size = disk_bytes(work / "hf")
    import_rss, import_s = peak_rss_bytes(
        "import-hf", "--hf-dir", str(work / "hf"), "--out", str(work / "megatron")
    )
    megatron_size = disk_bytes(work / "megatron")
    export_rss, export_s = peak_rss_bytes(
        "export-hf", "--ckpt", str(work / "megatron"), "--hf-template", str(work / "hf"),
        "--out", str(work / "exported"),
    )  # fmt: skip
    rows = [
        ("import-hf", hf_size, import_rss, import_s),
        ("export-hf", megatron_size, export_rss, export_s),
    ]
    print(
        f"{'direction':<10} {'reads (MB)':>11} {'peak RSS (MB)':>14} {'ratio':>6} {'time (s)':>9}"
    )
    for name, size, rss, seconds in rows:
        print(
            f"{name:<10} {size / 1e6:>11.1f} {rss / 1e6:>14.1f} {rss / size:>6.3f} {seconds:>9.1f}"
        )
    if options.work is None:
        shutil.rmtree(work)
    print(
        json.dumps(
            {
                "benchmark": "convert_memory",
                "hf_checkpoint_bytes": hf_size,
                "megatron_checkpoint_bytes": megatron_size,
                "import_peak_rss_bytes": import_rss,
                "export_peak_rss_bytes": export_rss,
                "import_peak_rss_ratio": round(import_rss / hf_size, 4),
                "export_peak_rss_ratio": round(export_rss / megatron_size, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
