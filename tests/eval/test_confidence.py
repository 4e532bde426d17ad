"""Intervals and the paired test against published values."""

from __future__ import annotations

import pytest

from mathtune.eval.confidence import compare, interval, mcnemar_exact, newcombe_paired, wilson


@pytest.mark.parametrize(("correct", "n", "low", "high"), [
    # Newcombe (1998), Stat Med 17:857, Table II, method 3 (Wilson score without correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_interval_matches_newcombe_1998(correct, n, low, high):
    assert wilson(correct, n) == pytest.approx((low, high), abs=5e-5)
    assert interval(correct, n) == {"low": pytest.approx(low, abs=1e-4), "high": pytest.approx(high, abs=1e-4)}


def test_wilson_interval_of_nothing_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_difference_matches_fagerland_lydersen_laake():
    # Complete response before and after consolidation therapy (Cavo et al. 2012), Newcombe
    # square-and-add interval as published by Fagerland, Lydersen & Laake (2017, ch. 8) and their
    # contingencytables package: -0.0621 (-0.1186 to -0.0046).
    assert newcombe_paired(59, 6, 16, 80) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)
    # Airway hyper-responsiveness (Bentur et al. 2009): -0.2857 (-0.507 to -0.026), Fagerland 2014.
    assert newcombe_paired(1, 1, 7, 12) == pytest.approx((-0.2857, -0.5069, -0.0256), abs=5e-5)


def test_paired_difference_stays_inside_minus_one_to_one():
    # 10 of 10 against 0 of 10: both Wilson distances 0.2775, added in squares (no correlation).
    assert newcombe_paired(0, 10, 0, 0) == pytest.approx((1.0, 0.6075, 1.0), abs=5e-5)
    assert newcombe_paired(0, 0, 3, 0) == pytest.approx((-1.0, -1.0, -0.2059), abs=5e-5)


@pytest.mark.parametrize(("only_first", "only_second", "p"), [
    (1, 7, 0.0703),    # Bentur et al.: exact conditional p = 0.070 (Fagerland et al. 2013, BMC MRM 13:91)
    (6, 16, 0.0525),   # Cavo et al.: exact conditional p = 0.052 (same paper)
    (12, 2, 0.0129),   # Armitage & Berry (1994, p. 127), exact (Liddell) p = 0.0129 (StatsDirect)
    (0, 0, 1.0), (5, 5, 1.0), (0, 5, 0.0625),
])
def test_mcnemar_exact_matches_published_p_values(only_first, only_second, p):
    assert mcnemar_exact(only_first, only_second) == pytest.approx(p, abs=5e-5)
    assert mcnemar_exact(only_second, only_first) == mcnemar_exact(only_first, only_second)


def test_compare_counts_the_discordant_pairs_of_the_same_problems():
    base = [True, True, False, False, False, True]
    tuned = [True, False, True, True, False, True]
    result = compare(base, tuned)
    assert (result["only_base"], result["only_tuned"]) == (1, 2)
    assert result["difference"] == pytest.approx(1 / 6, abs=1e-4)
    assert result["p_value"] == 1.0 and result["low"] < 0 < result["high"]
    with pytest.raises(ValueError):
        compare([True], [True, False])
