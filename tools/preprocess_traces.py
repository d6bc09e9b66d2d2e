#!/usr/bin/env python
"""Teacher traces (JSONL / JSON / Parquet / HF dataset dirs) → a trace dataset.

    python tools/preprocess_traces.py --input traces.jsonl --output-prefix data/traces \
        --tokenizer STUDENT_TOKENIZER_DIR [--workers 8] [--max-seq-length 16384] \
        [--score-with TEACHER_DIR --score-topk 8] [--ref-model STUDENT_DIR]
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.arguments import add_preprocess_args, preprocess_config_from_args  # noqa: E402
from megatron_dcod.data.preprocess import preprocess_traces  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = add_preprocess_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("megatron_dcod").setLevel(logging.INFO)
    try:
        config = preprocess_config_from_args(args)
        meta = preprocess_traces(config, command=shlex.join(sys.argv))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts, records = meta["counts"], meta["records"]
    print(
        f"{config.output_prefix}: {counts['traces']} traces, {counts['tokens']} tokens "
        f"({counts['supervised_tokens']} supervised); records: {records}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
