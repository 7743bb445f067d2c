"""Paired comparisons: the interval covers the truth at its nominal rate and the p-value is exact where it can
be."""

import itertools

import numpy as np
import pandas as pd
import pytest

from rlvr.errors import InputError
from rlvr.statistics import mean_interval, paired, per_problem_accuracy, sign_flip_p_value


def series(values, ids=None) -> pd.Series:
    return pd.Series(values, index=ids if ids is not None else range(len(values)), dtype=float)


def test_the_difference_is_b_minus_a_per_problem_and_pairs_by_id():
    a = series([1, 0, 0, 1], ids=["p1", "p2", "p3", "p4"])
    b = series([1, 1, 1, 1], ids=["p4", "p3", "p2", "p1"])
    result = paired(a, b)
    assert result.diff == 0.5 and result.units == 4
    assert result.ci_low <= 0.5 <= result.ci_high
    with pytest.raises(ValueError, match="same problems"):
        paired(a, series([1, 1], ids=["p1", "x"]))


def test_small_samples_get_the_exact_sign_flip_p_value():
    differences = np.array([1.0, 1.0, 1.0, -0.5, 0.0])
    # all 16 sign patterns of the four nonzero differences, by hand
    sums = [
        abs(sum(s * d for s, d in zip(signs, differences[:4], strict=True)))
        for signs in itertools.product((-1, 1), repeat=4)
    ]
    expected = sum(total >= 2.5 for total in sums) / 16
    assert sign_flip_p_value(differences, np.random.default_rng(0), 100) == expected == 0.25
    assert sign_flip_p_value(np.zeros(5), np.random.default_rng(0), 100) == 1.0


def test_a_clear_gain_is_significant_and_no_gain_is_not():
    rng = np.random.default_rng(1)
    a = series(rng.integers(0, 2, 300))
    better = paired(a, series(np.maximum(a, rng.integers(0, 2, 300) * (rng.random(300) < 0.5))))
    assert better.diff > 0.1 and better.ci_low > 0 and better.p_value < 0.001
    same = paired(a, a)
    assert same.diff == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Repeated experiments with a known true gain of 0.1: coverage within a binomial margin of 95%."""
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for trial in range(trials):
        a = rng.random(150) < 0.4
        b = rng.random(150) < 0.5
        result = paired(series(a), series(b), seed=trial, resamples=2000)
        covered += result.ci_low <= 0.1 <= result.ci_high
    assert 0.89 <= covered / trials <= 0.99


def test_per_problem_accuracy_averages_samples_within_each_problem():
    samples = pd.DataFrame(
        {
            "dataset": ["d"] * 4 + ["e"],
            "id": ["1", "1", "2", "2", "1"],
            "correct": [True, False, True, True, False],
        }
    )
    accuracy = per_problem_accuracy(samples)
    assert accuracy.to_dict() == {("d", "1"): 0.5, ("d", "2"): 1.0, ("e", "1"): 0.0}
    samples["lenient_correct"] = [True, True, True, True, False]
    assert per_problem_accuracy(samples, "lenient_correct").to_dict() == {
        ("d", "1"): 1.0,
        ("d", "2"): 1.0,
        ("e", "1"): 0.0,
    }


def test_seeds_are_paired_within_and_averaged_per_problem_before_resampling():
    index = pd.MultiIndex.from_product([[0, 1], ["d"], ["p1", "p2", "p3"]], names=["seed", "dataset", "id"])
    a = pd.Series([0, 0, 1, 1, 0, 0], index=index, dtype=float)
    b = pd.Series([1, 0, 1, 1, 1, 1], index=index, dtype=float)
    result = paired(a, b)
    assert result.units == 3  # problems, not seed x problem pairs
    assert result.diff == pytest.approx((1 + 0 + 0 + 0 + 1 + 1) / 6)
    # per problem, averaged over seeds: p1 0.5, p2 0.5, p3 0.5; every sign pattern but the all-equal ones is
    # smaller
    assert result.p_value == 0.25


@pytest.mark.parametrize("where", ["a", "b", "a seed"])
def test_a_nan_score_is_refused_with_one_line(where):
    """A NaN difference passes the `!= 0` filter and never compares, so it would come out as p = 0."""
    a, b = series([1, 0, 1, 0, 1, 1]), series([1, 1, 1, 1, 0, 1])
    if where == "a seed":  # a mean over seeds would drop the NaN without a word
        index = pd.MultiIndex.from_product([[0, 1], range(3)], names=["seed", "id"])
        a, b = pd.Series(a.to_numpy(), index=index), pd.Series(b.to_numpy(), index=index)
    (a if where.startswith("a") else b).iloc[2] = np.nan
    with pytest.raises(InputError, match="not all finite numbers") as caught:
        paired(a, b)
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="not all finite numbers"):
        mean_interval(b if where == "b" else a)
