"""The lab's plots: accuracy by method with error bars, ExAccErr curves, mean weight by
position (each the mean over seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_all(results: dict, out: Path) -> dict[str, Path]:
    """Writes the plots that have data; returns {title: path}. Without matplotlib: none."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    matplotlib.use("Agg")
    methods = [method for method in results["methods"] if method["runs"]]
    if not methods:
        return {}
    written = {"accuracy by method": accuracy_plot(results, methods, out / "accuracy.png")}
    if "exacc_err_curve" in methods[0]["runs"][0]:
        written["ExAccErr by length"] = exacc_plot(results, methods, out / "exacc_err.png")
    written["mean weight by position"] = weight_plot(methods, out / "weights_by_position.png")
    return written


def accuracy_plot(results: dict, methods: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    evals = results["evals"]
    figure, axis = plt.subplots(figsize=(max(6, 0.7 * len(methods) * len(evals)), 3.8))
    width = 0.8 / len(evals)
    for offset, evaluation in enumerate(evals):
        stats = [method["summary"][f"accuracy/{evaluation}"] for method in methods]
        x = np.arange(len(methods)) + offset * width
        axis.bar(x, [s["mean"] * 100 for s in stats], width, yerr=[s["std"] * 100 for s in stats],
                 capsize=3, label=evaluation)  # fmt: skip
        for run_x, method in zip(x, methods):  # every seed as a dot
            values = [run["accuracy"][evaluation] * 100 for run in method["runs"]]
            axis.scatter([run_x] * len(values), values, s=8, color="black", zorder=3)
    if results.get("initial"):
        axis.axhline(results["initial"]["accuracy"][evals[0]] * 100, color="grey", linestyle="--",
                     linewidth=0.8, label="student before")  # fmt: skip
    axis.set_xticks(np.arange(len(methods)) + width * (len(evals) - 1) / 2)
    axis.set_xticklabels([method["label"] for method in methods], rotation=35, ha="right")
    axis.set(ylabel="accuracy (%)", title=f"{results['lab']}: mean ± std over seeds")
    axis.legend(fontsize=8)
    return _save(figure, path)


def exacc_plot(results: dict, methods: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for index, method in enumerate(methods):
        curves = np.array([_finite(run["exacc_err_curve"]) for run in method["runs"]])
        lengths = np.arange(1, curves.shape[1] + 1)
        axis.plot(lengths, np.nanmean(curves, axis=0), color=f"C{index % 10}",
                  linestyle="-" if index < 10 else "--", label=method["label"])  # fmt: skip
    initial = results.get("initial")
    if initial and "exacc_err_curve" in initial:
        curve = _finite(initial["exacc_err_curve"])
        axis.plot(np.arange(1, len(curve) + 1), curve, color="grey", linestyle=":",
                  label="student before")  # fmt: skip
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set_yscale("symlog", linthresh=50)  # linear within ±50%, then logarithmic
    axis.set(xlabel="generation length l", ylabel="ExAccErr(l) (%)",
             title=f"{results['lab']}: excess accumulated error")  # fmt: skip
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def weight_plot(methods: list[dict], path: Path) -> Path:
    """The weighted methods only (a weight of 1 everywhere, as SFT's, is left out)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    shown = 0
    for method in methods:
        curves = [run["weight_by_position"] for run in method["runs"]]
        start = method["runs"][0].get("initial_weight_by_position") or []
        if all(w == 1.0 for curve in [*curves, start] for w in curve):
            continue
        length = min(len(curve) for curve in curves)
        mean = np.mean([curve[:length] for curve in curves], axis=0)
        color = f"C{shown % 10}"
        axis.plot(np.arange(length), mean, color=color, label=method["label"])
        if start:  # the same for every seed: the initial student
            axis.plot(np.arange(len(start)), start, color=color, linestyle=":")
        shown += 1
    axis.axhline(1.0, color="grey", linewidth=0.6)
    axis.set(xlabel="response position (held-out teacher traces)", ylabel="mean w",
             title="training weight by position: at the start (dotted) and the end")  # fmt: skip
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def _finite(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
