#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron (torch_dist).

    python tools/convert_checkpoint.py import-hf --hf-dir HF_DIR --out CKPT \
        [--tensor-model-parallel-size N --pipeline-model-parallel-size M] [--dtype bf16|fp32]
    python tools/convert_checkpoint.py export-hf --ckpt CKPT --hf-template HF_DIR --out DIR \
        [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]

Train from an imported checkpoint with `--load CKPT` (a release checkpoint: iteration 0, no
optimizer state), or `--pretrained-checkpoint CKPT --finetune` next to a separate --save dir.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.arguments import add_convert_args, convert_config_from_args  # noqa: E402
from megatron_dcod.config import ImportConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = add_convert_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    config = convert_config_from_args(parser.parse_args(argv))
    try:
        if isinstance(config, ImportConfig):
            from megatron_dcod.checkpoint.import_hf import import_hf

            out = import_hf(config)
        else:
            from megatron_dcod.checkpoint.export_hf import export_hf

            out = export_hf(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
