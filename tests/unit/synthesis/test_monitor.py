"""MOTAB's and SKD's decision functions against values computed by hand."""

import math

import pytest

from megatron_dcod.inference.engine import Score
from megatron_dcod.synthesis import monitor


def test_oracle_value_is_the_geometric_mean_probability():
    assert monitor.oracle_value([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert monitor.oracle_value([0.0]) == 1.0
    with pytest.raises(ValueError, match="empty step"):
        monitor.oracle_value([])


def test_topk_entropy_renormalizes_the_top_k():
    # top-2 log-probs log 0.3 and log 0.1 renormalize to 0.75 / 0.25
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert monitor.topk_entropy([math.log(0.3), math.log(0.1)]) == pytest.approx(expected)
    assert monitor.topk_entropy([math.log(0.2)] * 4) == pytest.approx(math.log(4))
    assert monitor.topk_entropy([-3.0]) == 0.0
    assert monitor.topk_entropy([]) == 0.0


def test_boundary_and_breach():
    assert monitor.breach_boundary(0.0, 0.2, 1.0) == pytest.approx(0.2)
    assert monitor.breach_boundary(math.log(2), 0.2, 1.0) == pytest.approx(0.1)
    assert monitor.breach_boundary(math.log(2), 0.2, 0.0) == pytest.approx(0.2)
    assert monitor.is_breach(0.09, 0.1) and not monitor.is_breach(0.1, 0.1)


def test_root_cause_is_the_sharpest_drop_after_a_safe_step():
    boundaries = [0.2] * 4
    # drops: 0.9->0.5 (-0.4), 0.5->0.6 (+0.1), 0.6->0.1 (-0.5): the breaching step is t*
    assert monitor.root_cause_step([0.9, 0.5, 0.6, 0.1], boundaries) == 3
    # the sharpest drop earlier than the breach wins: 0.9->0.3 (-0.6) vs 0.3->0.15 (-0.15)
    assert monitor.root_cause_step([0.9, 0.3, 0.15], [0.2] * 3) == 1
    # ties: the first minimum
    assert monitor.root_cause_step([0.8, 0.5, 0.8, 0.5], [0.1] * 4) == 1
    # a predecessor below its own boundary is no candidate
    assert monitor.root_cause_step([0.9, 0.8, 0.05], [0.2, 0.2, 0.2]) == 2
    assert monitor.root_cause_step([0.9, 0.8, 0.05], [0.2, 0.9, 0.2]) == 1


def test_root_cause_without_a_safe_predecessor_is_the_lowest_value():
    assert monitor.root_cause_step([0.05], [0.2]) == 0  # a breach at step 0
    assert monitor.root_cause_step([0.1, 0.05, 0.07], [0.2, 0.2, 0.2]) == 1
    with pytest.raises(ValueError):
        monitor.root_cause_step([0.1], [0.2, 0.2])


def test_teacher_budget():
    assert monitor.teacher_budget(32768, 1000) == 31768
    assert monitor.teacher_budget(1024, 1000) == 256


def test_connector_does_not_repeat_the_paragraph_break():
    revise = "\n\nHowever,\n\n"
    assert monitor.revise_connector("Step one.\n\n", revise) == "However,\n\n"
    assert monitor.revise_connector("Step one.\n", revise) == "\nHowever,\n\n"
    assert monitor.revise_connector("Step one", revise) == revise
    assert monitor.revise_connector("a.\n\n", "Wait, ") == "Wait, "


def test_failure_fallbacks():
    assert monitor.scored_value(Score(error="scoring failed: timeout")) == 1.0
    assert monitor.scored_value(Score([math.log(0.25)])) == pytest.approx(0.25)
    failed = Score([], [1, 2], [math.log(0.5)] * 2, error="scoring failed")  # a top-k, ignored
    assert monitor.scored_entropy(failed) == 0.0
    assert monitor.scored_value(Score([math.log(0.1)], error="scoring failed")) == 1.0
    assert monitor.step_value(Score(error="x")) is None
    assert monitor.scored_entropy(Score([], [1, 2], [math.log(0.5)] * 2)) == pytest.approx(
        math.log(2)
    )


def test_skd_rule():
    assert monitor.skd_accepts(0.5, 0.5, 0.9)  # 0.5 > 0.45
    assert not monitor.skd_accepts(0.45, 0.5, 0.9)  # strictly greater
    assert not monitor.skd_accepts(0.3, 0.5, 0.9)
    assert not monitor.skd_accepts(None, 0.5, 0.9) and not monitor.skd_accepts(0.9, None, 0.9)
