"""The lab's results: per-run figures read from each stage's own output, then mean ± std over
seeds per method, as results.json and results.md.

Per run: accuracy (pass@1 of each evaluation's summary.json), the validation CE (`base loss
value` of the last validation line of the training log: the unweighted token loss, comparable
between weightings), the weight diagnostics of the last `dcod weights` log line, the mean
training tokens/s, ExAccErr at the drift summary's reported lengths, and the stage times.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from megatron_dcod.lab.runner import INITIAL, Lab, Run

WEIGHT_FIELDS = {
    "w mean": "w_mean",
    "w ess": "w_ess",
    "w<0.1 frac": "w_small",
    "delta mean": "delta",
}
_NUMBER = r"([-+]?(?:\d[\d.]*(?:[eE][-+]?\d+)?|nan|inf))"
"""A number as the logs print it (`:.6E`: 1.234560E-01, NAN, -INF), matched ignoring case."""
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
"""Two-sided 95% critical values of Student's t by degrees of freedom (more: 1.96)."""


def run_figures(lab: Lab, run: Run) -> dict | None:
    """What one finished run measured; None while any of its stages is missing."""
    if any(not stage.output.exists() for stage in lab.stages(run)):
        return None
    directory = lab.run_dir(run)
    figures: dict = {"run": run.id, "seed": run.seed, "accuracy": {}}
    for evaluation in lab.spec.evals:
        summary = _json(directory / "eval" / evaluation.name / "summary.json")
        figures["accuracy"][evaluation.name] = summary["accuracy"]["pass@1"]
    if lab.spec.drift is not None:
        drift = _json(directory / "drift" / "summary.json")
        figures["exacc_err"] = {length: at["exacc_err"] for length, at in drift["at"].items()}
        figures["exacc_err_curve"] = drift["curves"]["exacc_err"]
        longest = drift["at"][max(drift["at"], key=int)]
        figures["student_prefix_error"] = longest["student_prefix_error"]  # R(L)
        figures["teacher_prefix_error"] = longest["teacher_prefix_error"]  # ε(L)
    if run.method is not None:
        figures |= train_log_figures((directory / "logs" / "train.log").read_text())
        weights = _json(directory / "weights.json")
        figures["weight_by_position"] = weights["mean_weight"]
        figures["initial_weight_by_position"] = weights.get("initial_mean_weight")
        figures["teacher_ce"] = weights.get("teacher_trace_ce")
    timings = directory / "timings.json"
    figures["seconds"] = _json(timings) if timings.exists() else {}
    return figures


def train_log_figures(log: str) -> dict:
    """The last validation's unweighted loss, the last weight diagnostics and the mean tokens/s
    of a train_hf log (of every attempt, when the run was resumed)."""
    figures: dict = {}
    validations = re.findall(r"base loss value: " + _NUMBER, log, re.I)
    figures["val_loss"] = float(validations[-1]) if validations else None
    weight_lines = [line for line in log.splitlines() if "| dcod weights |" in line]
    for name, key in WEIGHT_FIELDS.items():
        found = weight_lines and re.search(re.escape(name) + ": " + _NUMBER, weight_lines[-1], re.I)
        figures[key] = float(found.group(1)) if found else None
    speeds = [float(v) for v in re.findall(r"tokens/s: " + _NUMBER, log, re.I)]
    figures["tokens_per_s"] = float(np.mean(speeds)) if speeds else None
    return figures


def collect(lab: Lab) -> dict:
    """results.json's content: every finished run, and per method the mean ± std over seeds."""
    methods, runs_missing = [], []
    initial = run_figures(lab, Run(None, None)) if lab.spec.initial_student_row else None
    if lab.spec.initial_student_row and initial is None:
        runs_missing.append(INITIAL)
    for method in lab.spec.methods:
        per_seed = []
        for seed in lab.spec.seeds:
            figures = run_figures(lab, Run(method, seed))
            if figures is None:
                runs_missing.append(Run(method, seed).id)
            else:
                per_seed.append(figures)
        methods.append({"method": method.name, "label": method.label, "data": method.data,
                        "flags": list(method.flags), "runs": per_seed,
                        "summary": summarize(per_seed)})  # fmt: skip
    return {
        "lab": lab.spec.name,
        "spec": str(lab.spec.path),
        "seeds": list(lab.spec.seeds),
        "evals": [evaluation.name for evaluation in lab.spec.evals],
        "initial": initial,
        "methods": methods,
        "missing": runs_missing,
    }


def summarize(per_seed: list[dict]) -> dict:
    """Mean, sample std (ddof 1; 0 with one seed) and count of every scalar figure."""
    if not per_seed:
        return {}
    summary: dict = {"seeds": len(per_seed)}
    for evaluation in per_seed[0]["accuracy"]:
        summary[f"accuracy/{evaluation}"] = _stats([f["accuracy"][evaluation] for f in per_seed])
    scalars = ("val_loss", "teacher_ce", *WEIGHT_FIELDS.values(), "tokens_per_s")
    for key in (*scalars, "student_prefix_error", "teacher_prefix_error"):
        summary[key] = _stats([f.get(key) for f in per_seed])
    for length in per_seed[0].get("exacc_err", {}):
        summary[f"exacc_err/{length}"] = _stats([f["exacc_err"][length] for f in per_seed])
    summary["train_seconds"] = _stats([f["seconds"].get("train") for f in per_seed])
    return summary


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def markdown(results: dict, baseline: str | None = None) -> str:
    """One row per method (and the initial student): accuracy mean ± std per evaluation, the
    difference to `baseline` with its standard error, val CE, weights, ExAccErr, tokens/s."""
    methods = [m for m in results["methods"] if m["summary"]]
    baseline = baseline or (methods[0]["method"] if methods else None)
    base = next((m["summary"] for m in methods if m["method"] == baseline), None)
    first_summary = methods[0]["summary"] if methods else {}
    lengths = [key.split("/", 1)[1] for key in first_summary if key.startswith("exacc_err/")]
    evals = results["evals"]
    header = ["method", "data", *[f"{e} acc" for e in evals], f"{evals[0]} vs {baseline}",
              "teacher CE", "val loss", "w mean", "w ESS", "w<0.1", "Δ mean",
              *[f"ExAccErr@{length}" for length in lengths], "R, ε at the end", "tok/s",
              "seeds"]  # fmt: skip
    rows = []
    if results.get("initial"):
        initial = results["initial"]
        rows.append(["student (before)", "—", *[f"{initial['accuracy'][e]:.1%}" for e in evals],
                     "—", "—", "—", "—", "—", "—", "—",
                     *[_percent(initial.get("exacc_err", {}).get(length)) for length in lengths],
                     _drift_terms(initial), "—", "—"])  # fmt: skip
    for method in methods:
        s = method["summary"]
        first = f"accuracy/{evals[0]}"
        compared = base is not None and method["method"] != baseline
        rows.append([method["label"], method["data"],
                     *[_mean_std(s[f"accuracy/{e}"], percent=True) for e in evals],
                     _difference(s[first], base[first]) if compared else "—",
                     _mean_std(s["teacher_ce"]), _mean_std(s["val_loss"]), _mean_std(s["w_mean"]),
                     _mean_std(s["w_ess"]), _mean_std(s["w_small"]), _mean_std(s["delta"]),
                     *[_mean_std(s.get(f"exacc_err/{length}"), digits=0) for length in lengths],
                     _drift_terms({k: (s.get(k) or {}).get("mean") for k in DRIFT_TERMS}),
                     _mean_std(s["tokens_per_s"], digits=0), str(s["seeds"])])  # fmt: skip
    lines = [markdown_row(header), markdown_row(["---"] * len(header)), *map(markdown_row, rows)]
    if results["missing"]:
        lines.append(f"\nnot finished: {', '.join(results['missing'])}")
    return "\n".join(lines) + "\n"


DRIFT_TERMS = ("student_prefix_error", "teacher_prefix_error")


def _drift_terms(figures: dict) -> str:
    """R(L), ε(L): the accumulated KL along the student's and the teacher's own samples."""
    values = [figures.get(key) for key in DRIFT_TERMS]
    return "—" if None in values else f"{values[0]:.1f}, {values[1]:.1f}"


def _mean_std(stats: dict | None, percent: bool = False, digits: int = 3) -> str:
    if stats is None:
        return "—"
    if percent:
        return f"{stats['mean']:.1%} ± {stats['std']:.1%}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _difference(method: dict, base: dict) -> str:
    """Difference of the means in points ± its standard error; `*` when Welch's two-sided
    95% t-interval excludes 0 (n/a with one seed on either side)."""
    if method["n"] < 2 or base["n"] < 2:
        return "n/a"
    a, b = method["std"] ** 2 / method["n"], base["std"] ** 2 / base["n"]
    difference, error = method["mean"] - base["mean"], math.sqrt(a + b)
    beyond = ""
    if error > 0:
        dof = (a + b) ** 2 / (a**2 / (method["n"] - 1) + b**2 / (base["n"] - 1))
        critical = next((T_95[d] for d in sorted(T_95, reverse=True) if d <= dof), T_95[1])
        beyond = " *" if abs(difference) > (critical if dof <= 30 else 1.96) * error else ""
    return f"{difference * 100:+.1f} ± {error * 100:.1f}{beyond}"


def _percent(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_results(lab: Lab, baseline: str | None = None) -> dict:
    """results.json and results.md under the lab's out dir, and the plots; returns results."""
    from megatron_dcod.lab.plots import plot_all

    results = collect(lab)
    (lab.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results, baseline)
    notes = (
        f"\n{lab.spec.name}: {len(lab.spec.seeds)} seeds {list(lab.spec.seeds)}. acc: pass@1 "
        "(tools/eval_math.py), mean ± sample std over seeds; vs: the difference of the mean "
        "accuracy to the baseline in points ± its standard error (* where Welch's 95% "
        "t-interval excludes 0); teacher CE: the trained student's cross-entropy on the last "
        "traces of the teacher dataset (its validation split); val loss: the method's own "
        "unweighted token loss (CE, top-k KL or ToDi) on its own dataset's validation split; "
        "w: the training weights of the last log interval; ExAccErr@l: the excess accumulated "
        "error in % at generation length l (tools/measure_drift.py); R, ε: its two terms at the "
        "longest length (accumulated KL(teacher ‖ student) along the student's own samples, "
        "and along the teacher's; means over seeds); tok/s: training "
        "throughput.\n"
    )
    plots = plot_all(results, lab.out)
    notes += "".join(f"\n![{name}]({path.name})" for name, path in plots.items())
    (lab.out / "results.md").write_text(table + notes + "\n")
    results["table"] = table
    return results
