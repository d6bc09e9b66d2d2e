"""The quickstart's closing table (accuracy, loss, weights) and plot of the training curves.

Training figures come from the TensorBoard scalars that `megatron_dcod.train` writes (`base
loss` = the unweighted CE on the teacher's tokens, comparable between methods; `dcod/*` = the
weight diagnostics of docs/method.md); accuracies from the `summary.json` of tools/eval_math.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_dcod.lab.results import markdown_row

TABLE_COLUMNS = ("model", "held-out acc", "val loss", "w mean", "w ESS", "w<0.1", "Δ mean")


def latest_iteration(save_dir: Path) -> int | None:
    """The iteration of the last checkpoint Megatron wrote in `save_dir`, if any."""
    from megatron_dcod.checkpoint.megatron_side import TRACKER_FILE

    tracker = save_dir / TRACKER_FILE
    return int(tracker.read_text()) if tracker.exists() else None


def scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(iteration, value), ...]} over every event file of the dir (resumed runs too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                curves.setdefault(tag, {})[event.step] = event.value  # a rerun step: the last
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def last(curves: dict, tag: str) -> float | None:
    return curves[tag][-1][1] if curves.get(tag) else None


LABELS = {"motab_sft": "MOTAB (SFT)"}
"""Table names of the students that are not named after their weighting alone."""


def label(method: str) -> str:
    """The table row of a trained student: `sft` → SFT, `motab_sft` → MOTAB (SFT)."""
    return LABELS.get(method, method.upper())


def side_by_side(
    out: Path, models: dict[str, Path], methods, plot: Path | None, notes: tuple[str, ...] = ()
) -> str:
    """A markdown table, one row per evaluated model; the trained ones with their training
    figures (last logged values), then `notes`. Also writes it to `out/results.md` and the plot."""
    runs = {label(name): scalars(out / "checkpoints" / name / "tensorboard") for name in methods}
    rows = []
    for name, model_dir in models.items():
        summary = json.loads((out / "eval" / model_dir.name / "summary.json").read_text())
        curves = runs.get(name, {})
        figures = [
            last(curves, tag)
            for tag in ("base loss validation", "dcod/w mean", "dcod/w ess", "dcod/w<0.1 frac",
                        "dcod/delta mean")
        ]  # fmt: skip
        rows.append([name, f"{summary['accuracy']['pass@1']:.1%}", *map(_number, figures)])
    lines = [markdown_row(TABLE_COLUMNS), markdown_row(["---"] * len(TABLE_COLUMNS))]
    lines += map(markdown_row, rows)
    problems = summary["problems"]
    table = "\n".join(lines) + (
        f"\n\nheld-out acc: greedy pass@1 on {problems} held-out problems (tools/eval_math.py); "
        "val loss: the unweighted token loss (cross-entropy, or the top-k KL / ToDi) on "
        "held-out teacher traces at the end; w: the training weights over the last log "
        "interval (w = 1 without DCOD); Δ = log π_θ − log π_T."
    )
    table += "".join(f"\n{note}" for note in notes)
    (out / "results.md").write_text(table + "\n")
    if plot is not None:
        plot_curves(runs, plot)
        table += f"\ncurves: {plot}"
    return table


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    """Left: training and validation CE of every method; right: DCOD's mean weight and ESS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, weights) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for index, (name, curves) in enumerate(runs.items()):
        color = f"C{index}"  # matplotlib's colour cycle
        for axes, tag, style, label in (
            (losses, "base loss", "-", "train"),
            (losses, "base loss validation", "o--", "validation"),
            (weights, "dcod/w mean", "-", "w mean"),
            (weights, "dcod/w ess", ":", "w ESS"),
        ):
            if curves.get(tag):
                steps, values = zip(*curves[tag])
                axes.plot(steps, values, style, color=color, label=f"{name} {label}")
    losses.set(xlabel="iteration", ylabel="token loss on teacher traces", yscale="log")
    losses.set_title("loss")
    weights.set(xlabel="iteration", ylabel="weight statistic")
    weights.set_title("corrective weights")
    for axes in (losses, weights):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)
