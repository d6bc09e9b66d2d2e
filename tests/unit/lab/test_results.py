"""The lab's figures: train_hf log parsing (as megatron_dcod/engines/log.py prints), mean ± std
over seeds, and the difference to the baseline with Welch's t-interval."""

import math

import pytest

from megatron_dcod.lab.results import _difference, markdown, summarize, train_log_figures

LOG = """\
 iteration       10 | dcod weights | w mean: 8.000000E-01 | w std: 1.0E-01 | w ess: 9.000000E-01 | w<0.1 frac: 2.000000E-02 | delta mean: -4.000000E-01 | dropped_microbatches: 0 |
 iteration       10/      20 | tokens/s: 1000.0 | lm loss: 5.0E-01 | base loss: 6.0E-01 |
 validation loss at iteration 10 | lm loss value: 4.000000E-01 | lm loss PPL: 1.49E+00 | base loss value: 5.000000E-01 |
 iteration       20 | dcod weights | w mean: 9.500000E-01 | w std: 1.0E-01 | w ess: 9.800000E-01 | w<0.1 frac: 1.000000E-02 | delta mean: -1.000000E-01 | dropped_microbatches: 0 |
 iteration       20/      20 | tokens/s: 3000.0 | lm loss: 3.0E-01 | base loss: 3.5E-01 |
 validation loss at iteration 20 | lm loss value: 2.000000E-01 | lm loss PPL: 1.22E+00 | base loss value: NAN |
"""


def test_the_log_gives_the_last_figures_and_the_mean_speed():
    figures = train_log_figures(LOG)
    assert math.isnan(figures["val_loss"])  # the last validation, even when it diverged
    assert figures["w_mean"] == 0.95 and figures["w_ess"] == 0.98
    assert figures["w_small"] == 0.01 and figures["delta"] == -0.1
    assert figures["tokens_per_s"] == 2000.0
    assert train_log_figures("no training happened") == {
        "val_loss": None, "w_mean": None, "w_ess": None, "w_small": None, "delta": None,
        "tokens_per_s": None,
    }  # fmt: skip


def _run(accuracy, exacc=None):
    return {"accuracy": {"heldout": accuracy}, "val_loss": 0.1, "teacher_ce": 0.2,
            "w_mean": 1.0, "w_ess": 1.0, "w_small": 0.0, "delta": 0.0, "tokens_per_s": 10.0,
            "exacc_err": {"16": exacc}, "seconds": {"train": 3.0}}  # fmt: skip


def test_summaries_are_sample_statistics_and_skip_missing_values():
    summary = summarize([_run(0.5, 10.0), _run(0.7, None), _run(0.9, float("nan"))])
    assert summary["seeds"] == 3
    assert summary["accuracy/heldout"]["mean"] == pytest.approx(0.7)
    assert summary["accuracy/heldout"]["std"] == pytest.approx(0.2)  # ddof 1
    assert summary["exacc_err/16"] == {"mean": 10.0, "std": 0.0, "n": 1}
    assert summarize([]) == {}


def test_the_difference_is_starred_only_beyond_the_welch_interval():
    base = {"mean": 0.50, "std": 0.02, "n": 3}
    close = {"mean": 0.53, "std": 0.02, "n": 3}  # t = 0.03 / 0.0163 = 1.8 < 2.78
    far = {"mean": 0.60, "std": 0.02, "n": 3}  # t = 6.1
    assert _difference(close, base) == "+3.0 ± 1.6"
    assert _difference(far, base) == "+10.0 ± 1.6 *"
    assert _difference({"mean": 0.6, "std": 0.0, "n": 1}, base) == "n/a"


def test_the_table_has_a_row_per_method_and_names_the_baseline():
    results = {
        "evals": ["heldout"],
        "initial": {"accuracy": {"heldout": 0.1}, "exacc_err": {"16": 300.0}},
        "methods": [
            {"method": "sft", "label": "SFT", "data": "teacher",
             "summary": summarize([_run(0.5, 20.0), _run(0.52, 22.0)])},
            {"method": "dcod", "label": "DCOD", "data": "teacher",
             "summary": summarize([_run(0.8, 5.0), _run(0.82, 7.0)])},
            {"method": "dft", "label": "DFT", "data": "teacher", "summary": {}},
        ],  # fmt: skip
        "missing": ["dft.seed1"],
    }
    table = markdown(results, baseline="sft")
    lines = table.splitlines()
    assert "heldout vs sft" in lines[0] and "ExAccErr@16" in lines[0]
    assert lines[2].startswith("| student (before) | — | 10.0% |") and "| 300 |" in lines[2]
    assert lines[3].startswith("| SFT | teacher | 51.0% ± 1.4% | — |")
    assert lines[4].startswith("| DCOD | teacher | 81.0% ± 1.4% | +30.0 ± 1.4 * |")
    assert "| 6 ± 1 |" in lines[4] and len(lines) == 7 and "not finished: dft.seed1" in table
