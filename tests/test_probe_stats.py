"""Probe statistics against hand-computed values, and the probes reporting them.

Wilson for 9/12: p = 0.75, z = 1.96: centre (0.75 + z²/24) / (1 + z²/12) = 0.6894, half-width
z·sqrt(0.75·0.25/12 + z²/576) / (1 + z²/12) = 0.2217 -> [0.4677, 0.9111]. McNemar with 1 and 9
discordant items: 2·(C(10,0) + C(10,1)) / 2^10 = 22/1024 = 0.021484375.
"""

from __future__ import annotations

import pytest

from specdsl.probes.accuracy import paired_comparisons, score_accuracy
from specdsl.probes.position.items import PositionResult
from specdsl.probes.self_correction import score_self_correction
from specdsl.probes.stats import (bootstrap_interval, max_min_gap, mcnemar_exact, paired_difference,
                                  percent_interval, wilson_interval)


def test_wilson_against_hand_computed_values():
    lo, hi = wilson_interval(9, 12)
    assert lo == pytest.approx(0.4677, abs=1e-4) and hi == pytest.approx(0.9111, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # 0/10: upper bound z²/(n + z²) = 3.8415 / 13.8415 = 0.2775
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None
    assert percent_interval(9, 12) == [46.8, 91.1]
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mcnemar_exact_against_hand_computed_values():
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0                       # capped at 1
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)      # 2 * (1/2)^6


def test_paired_difference_counts_and_interval():
    a = [True, True, True, False] * 5   # 15/20 right
    b = [False, True, False, False] * 5  # 5/20 right; b never right where a is wrong
    out = paired_difference(a, b)
    assert (out["n"], out["diff"], out["only_this_right"], out["only_other_right"]) == (20, 50.0, 10, 0)
    assert out["p_mcnemar"] == pytest.approx(2 / 1024, rel=5e-3)  # kept to 3 significant digits
    lo, hi = out["ci95"]
    assert lo <= 50.0 <= hi and 0 < lo and hi <= 100
    assert paired_difference(a, b) == out  # deterministic for a seed
    assert paired_difference(a, a)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


def test_accuracy_results_carry_intervals_and_paired_tests():
    rows = [{"answer": str(i)} for i in range(12)]
    exact = lambda answer, gold: answer == gold  # noqa: E731
    student = score_accuracy(rows, [str(i) if i < 9 else "x" for i in range(12)], exact)
    base = score_accuracy(rows, [str(i) if i < 3 else "x" for i in range(12)], exact)
    assert student.to_dict()["ci95"] == [46.8, 91.1]
    (paired,) = paired_comparisons({"student": student, "base": base}, "base")
    assert (paired["condition"], paired["vs"], paired["only_this_right"], paired["only_other_right"]) == \
        ("student", "base", 6, 0)
    assert paired["p_mcnemar"] == pytest.approx(round(2 / 64, 4))
    assert paired_comparisons({"student": student}, None) == []


def test_self_correction_reports_flip_intervals_and_mcnemar():
    rows = [{"answer": "1"}] * 10
    # 4 wrong -> right, 1 right -> wrong, 3 right -> right, 2 wrong -> wrong
    outputs = (["Answer: 2\nVerification: incorrect\n\nAnswer: 1"] * 4
               + ["Answer: 1\nVerification: incorrect\n\nAnswer: 2"]
               + ["Answer: 1\nVerification: correct"] * 3
               + ["Answer: 2\nVerification: correct"] * 2)
    res = score_self_correction(rows, outputs, lambda a, g: a == g)
    d = res.to_dict()
    assert (d["wrong_to_right"], d["right_to_wrong"]) == (4, 1)
    assert d["wrong_to_right_ci95"] == percent_interval(4, 6)   # 6 initially wrong
    assert d["right_to_wrong_ci95"] == percent_interval(1, 4)   # 4 initially right
    assert d["initial_ci95"] == percent_interval(4, 10) and d["final_ci95"] == percent_interval(7, 10)
    assert d["p_mcnemar"] == pytest.approx(round(mcnemar_exact(4, 1), 4))


def test_position_intervals_per_bucket_and_on_the_gap():
    scores = ((1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.0))
    res = PositionResult(task="document", per_bucket=(100.0, 25.0), counts=(4, 4), avg=62.5, gap=75.0, n=8,
                         bucket_scores=scores)
    d = res.to_dict()
    assert d["per_bucket_ci95"] == [percent_interval(4, 4), percent_interval(1, 4)]
    lo, hi = d["gap_ci95"]
    assert lo <= 75.0 <= hi and hi <= 100.0
    assert bootstrap_interval([[100.0] * 4, [0.0] * 4], max_min_gap) == [100.0, 100.0]
    assert PositionResult("code", (50.0,), (1,), 50.0, 0.0, 1).to_dict().get("gap_ci95") is None
