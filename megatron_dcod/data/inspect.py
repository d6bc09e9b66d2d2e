"""tools/inspect_traces.py: one trace as aligned columns, and dataset-level statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_dcod.data.sources import SOURCE_NAMES, SUPERVISED_SOURCES
from megatron_dcod.data.trace_format import TraceDataset

PERCENTILES = (1, 10, 50, 90, 99)


def format_trace(
    dataset: TraceDataset, index: int, tokenizer: Any | None = None, max_rows: int | None = None
) -> str:
    """Rows of (position, token id, decoded text, mask, teacher log-prob, source, ...)."""
    trace = dataset[index]
    columns = ["pos", "token", "text", "mask"]
    optional = [
        name
        for name in ("teacher_logprobs", "ref_logprobs", "teacher_topk_ids", "source")
        if dataset.has(name)
    ]
    header = columns + [_short_name(name) for name in optional]
    rows = [header]
    length = len(trace.tokens) if max_rows is None else min(max_rows, len(trace.tokens))
    for position in range(length):
        token = int(trace.tokens[position])
        text = repr(tokenizer.decode([token]))[1:-1] if tokenizer is not None else ""
        row = [str(position), str(token), text, str(int(trace.loss_mask[position]))]
        for name in optional:
            row.append(_cell(name, trace, position))
        rows.append(row)
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    if length < len(trace.tokens):
        lines.append(f"... {len(trace.tokens) - length} more tokens")
    title = f"trace {index} of {dataset.prefix}: {len(trace.tokens)} tokens, "
    title += f"{int(trace.loss_mask.sum())} supervised"
    return "\n".join([title] + [line.rstrip() for line in lines])


def _short_name(name: str) -> str:
    return {"teacher_logprobs": "logp_teacher", "ref_logprobs": "logp_ref"}.get(
        name, "teacher_top1" if name == "teacher_topk_ids" else name
    )


def _cell(name: str, trace: Any, position: int) -> str:
    if name == "source":
        return SOURCE_NAMES.get(int(trace.source[position]), "?")
    if name == "teacher_topk_ids":
        top_id = int(trace.teacher_topk_ids[position, 0])
        top_logprob = float(trace.teacher_topk_logprobs[position, 0])
        return f"{top_id}:{top_logprob:.3f}" if trace.loss_mask[position] else "-"
    value = float(getattr(trace, name)[position])
    return f"{value:.4f}" if trace.loss_mask[position] else "-"


def dataset_summary(dataset: TraceDataset) -> dict[str, Any]:
    """meta.json highlights plus a scan of the arrays (vectorized over the whole dataset)."""
    meta = dataset.meta
    lengths = dataset.lengths.astype(np.int64)  # [n traces]
    supervised = dataset.flat("loss_mask").astype(bool)  # [total tokens]
    summary = {
        "prefix": dataset.prefix,
        "arrays": meta["arrays"],
        "topk": meta["topk"],
        "tokenizer": meta["tokenizer"]["name_or_path"],
        "records": meta.get("records", {}),
        "traces": len(dataset),
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(supervised.sum()),
        "supervised_fraction": float(supervised.mean()),
        "length": _distribution(lengths),
    }
    if dataset.has("source"):  # supervised tokens by who wrote them
        counts = np.bincount(dataset.flat("source")[supervised], minlength=len(SOURCE_NAMES))
        summary["supervised_by_source"] = {
            name: int(counts[code])
            for code, name in SOURCE_NAMES.items()
            if name in SUPERVISED_SOURCES
        }
    for name in ("teacher_logprobs", "ref_logprobs"):
        if dataset.has(name):
            summary[name] = _distribution(dataset.flat(name)[supervised].astype(np.float64))
    return summary


def _distribution(values: np.ndarray) -> dict[str, float]:
    stats = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    for percentile, value in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        stats[f"p{percentile}"] = float(value)
    return stats


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"dataset {summary['prefix']}"]
    for key in ("arrays", "topk", "tokenizer", "records", "traces", "tokens", "supervised_tokens"):
        lines.append(f"  {key:<20} {summary[key]}")
    lines.append(f"  {'supervised_fraction':<20} {summary['supervised_fraction']:.4f}")
    if "supervised_by_source" in summary:
        lines.append(f"  {'supervised_by_source':<20} {summary['supervised_by_source']}")
    for key in ("length", "teacher_logprobs", "ref_logprobs"):
        if key in summary:
            cells = ", ".join(f"{name} {value:.4g}" for name, value in summary[key].items())
            lines.append(f"  {key:<20} {cells}")
    return "\n".join(lines)
