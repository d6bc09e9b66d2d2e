"""Mean training weight by response position, and the student's CE, on held-out teacher traces.

    python -m megatron_dcod.lab.positions --student DIR --data-path PREFIX --out FILE.json \
        [--traces 64] [--initial-student DIR] -- [train flags: --dcod-* and --seq-length are
        read, the rest ignored]

On the last --traces traces of the dataset (a `--split 95,5,0` run validates on the last 5%:
Megatron's splits are contiguous ranges), each cut to --seq-length as training cuts it: the
student's log-prob of every supervised token (one forward pass), Δ_t = log π_θ − log π_T, and
the weight w_t the run's `--dcod-*` flags give it (the correction's own `token_weights` and
`--dcod-train-sources` mask, so every weighting and scope is the training code's). Written: the
mean w, mean Δ and token count at each response position (0 = the first supervised token), and
`teacher_trace_ce`, the mean −log π_θ over the supervised tokens. With --initial-student, the
same for the model the run started from (`initial_*`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def weights_by_position(student, dataset, correction, traces: int, seq_length=None) -> dict:
    """Per response position: mean w_t, mean Δ_t and the token count; and the CE."""
    from megatron_dcod.correction.objective import restricted_to_train_sources, token_weights

    _check_arrays(dataset, correction)
    sums_w, sums_delta, counts, nll, tokens_seen = {}, {}, {}, 0.0, 0
    device = next(student.parameters()).device
    first = max(0, len(dataset) - traces)
    for index in range(first, len(dataset)):
        trace = dataset[index] if seq_length is None else dataset[index].truncated(seq_length)
        tokens = torch.tensor(trace.tokens, dtype=torch.long)[None]  # [1, T], a copy
        with torch.no_grad():
            logits = student(input_ids=tokens.to(device)).logits.float().cpu()  # [1, T, V]
        picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])
        logp = torch.cat([torch.zeros(1, 1), picked[..., 0]], dim=1)  # [1, T]: token i's
        batch = {"loss_mask": torch.as_tensor(trace.loss_mask, dtype=torch.float32)[None]}
        batch["segment_ids"] = torch.zeros_like(tokens)
        for name in ("ref_logprobs", "source"):
            if getattr(trace, name) is not None:
                batch[name] = torch.as_tensor(getattr(trace, name))[None]
        batch = restricted_to_train_sources(correction, batch)
        mask = batch["loss_mask"]  # [1, T]
        delta = (logp - torch.as_tensor(trace.teacher_logprobs)[None]) * mask  # [1, T]
        weights = token_weights(correction, logp, delta, batch)[0]  # [T]
        nll -= float((logp * mask).sum())
        tokens_seen += int(mask.sum())
        for position, token in enumerate(np.flatnonzero(mask[0].numpy())):
            sums_w[position] = sums_w.get(position, 0.0) + float(weights[token])
            sums_delta[position] = sums_delta.get(position, 0.0) + float(delta[0, token])
            counts[position] = counts.get(position, 0) + 1
    positions = sorted(counts)
    return {
        "weighting": correction.weighting,
        "traces": len(dataset) - first,
        "teacher_trace_ce": nll / max(1, tokens_seen),
        "positions": positions,
        "mean_weight": [round(sums_w[p] / counts[p], 6) for p in positions],
        "mean_delta": [round(sums_delta[p] / counts[p], 6) for p in positions],
        "count": [counts[p] for p in positions],
    }


def _check_arrays(dataset, correction) -> None:
    needed = ["teacher_logprobs"]
    needed += ["ref_logprobs"] if correction.weighting == "iw_sft" else []
    needed += ["source"] if correction.restricts_sources else []
    missing = [name for name in needed if not dataset.has(name)]
    if missing:
        raise ValueError(
            f"{dataset.prefix}: no {', '.join(missing)} array: the weights by position need "
            f"the teacher's log-probs (and, for {correction.weighting}, what its weights read)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, train_flags = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--traces", type=int, default=64, help="the dataset's last N traces")
    parser.add_argument(
        "--initial-student", type=Path, help="also the weights the run started with (this model)"
    )
    args = parser.parse_args(own)
    from megatron_dcod.arguments import add_correction_args, correction_config_from_args
    from megatron_dcod.data.trace_format import TraceDataset

    flags = argparse.ArgumentParser(add_help=False)
    add_correction_args(flags)
    flags.add_argument("--seq-length", type=int)
    known = flags.parse_known_args(train_flags)[0]
    correction = correction_config_from_args(known)
    dataset = TraceDataset(args.data_path)
    try:
        result = _measure(args.student, dataset, correction, args.traces, known.seq_length)
        if args.initial_student is not None:
            at_start = _measure(
                args.initial_student, dataset, correction, args.traces, known.seq_length
            )
            result |= {f"initial_{key}": at_start[key] for key in at_start if key != "positions"}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result) + "\n")
    temporary.replace(args.out)
    print(f"mean weight by position of {result['traces']} traces → {args.out}")
    return 0


def _measure(model_dir: Path, dataset, correction, traces: int, seq_length) -> dict:
    """One model at a time (on the GPU when there is one, in bf16 there)."""
    from megatron_dcod.inference.models import load_causal_lm

    cuda = torch.cuda.is_available()
    model = load_causal_lm(model_dir, torch.bfloat16 if cuda else torch.float32).eval()
    model = model.to("cuda" if cuda else "cpu")
    return weights_by_position(model, dataset, correction, traces, seq_length)


if __name__ == "__main__":
    sys.exit(main())
