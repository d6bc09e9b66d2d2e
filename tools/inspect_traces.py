#!/usr/bin/env python
"""Show a trace dataset: statistics, and one trace as aligned columns.

python tools/inspect_traces.py PREFIX [--index 0] [--tokenizer DIR] [--max-rows 200]
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megatron_dcod.data.chat import load_tokenizer  # noqa: E402
from megatron_dcod.data.inspect import dataset_summary, format_summary, format_trace  # noqa: E402
from megatron_dcod.data.trace_format import TraceDataset, TraceFormatError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="dataset prefix (as given to --output-prefix)")
    parser.add_argument("--index", type=int, default=0, help="trace to show (-1: none)")
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="tokenizer dir for decoded text (default: the one in meta.json)",
    )
    parser.add_argument("--max-rows", type=int, default=None, help="show at most N tokens")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        dataset = TraceDataset(args.prefix)
    except TraceFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = dataset_summary(dataset)
    print(json.dumps(summary) if args.json else format_summary(summary))
    if args.index >= 0:
        tokenizer_dir = args.tokenizer or dataset.meta["tokenizer"]["name_or_path"]
        tokenizer = load_tokenizer(tokenizer_dir) if Path(tokenizer_dir).is_dir() else None
        print()
        print(format_trace(dataset, args.index, tokenizer, args.max_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
