"""Seed statistics behind the comparison and ablation tables: spread, standard errors and verdicts."""

from __future__ import annotations

import math

import pytest

from nativetok.eval.statistics import Difference, Summary, verdict


def test_summary_reports_mean_and_sample_standard_deviation():
    s = Summary.of([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.sd == 1.0 and s.n == 3 and s.text() == "2.00 ± 1.00"
    assert s.standard_error == pytest.approx(1 / math.sqrt(3))
    single = Summary.of([5.0])
    assert math.isnan(single.sd) and single.text() == "5.00 ± n/a"
    with pytest.raises(ValueError):
        Summary.of([])


def test_a_difference_is_decisive_only_beyond_two_standard_errors():
    a, b = Summary.of([10.0, 10.2, 9.8]), Summary.of([12.0, 12.2, 11.8])
    d = Difference.between(a, b)
    assert d.value == pytest.approx(-2.0) and d.decisive and "exceeds 2 SE" in d.text()
    close = Difference.between(Summary.of([10.0, 11.0, 9.0]), Summary.of([10.5, 11.5, 9.5]))
    assert not close.decisive and "within 2 SE" in close.text()
    assert not Difference.between(Summary.of([1.0]), Summary.of([5.0])).decisive  # one seed: no spread


def test_verdicts_name_the_better_side_for_either_direction():
    low, high = Summary.of([5.0, 5.1, 4.9]), Summary.of([8.0, 8.1, 7.9])
    assert verdict("gFID", "nativetok", low, "parallel", high, lower_is_better=True).startswith(
        "gFID: nativetok is better than parallel by 3.00")
    assert verdict("PSNR", "nativetok", low, "parallel", high, lower_is_better=False).startswith(
        "PSNR: parallel is better than nativetok by 3.00")
    undecided = verdict("gFID", "a", Summary.of([5.0, 7.0, 6.0]), "b", Summary.of([6.0, 5.0, 7.0]), True)
    assert undecided.startswith("gFID: no decision between a and b") and "3 seeds" in undecided
