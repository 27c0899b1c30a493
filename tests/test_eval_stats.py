"""Evaluation statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from character_baker.core import stats


def test_wilson_interval_of_zero_successes_is_hand_computed():
    # p = 0, n = 10, z = 1.96: centre = half = (z^2 / 2n) / (1 + z^2 / n) = 0.19207 / 1.38415
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27754, abs=1e-4)


def test_proportion_has_value_n_interval_and_standard_error():
    estimate = stats.proportion(3, 4)
    assert estimate.value == 0.75 and estimate.n == 4
    assert estimate.se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert estimate.ci[0] < 0.75 < estimate.ci[1]
    assert stats.proportion(0, 0).to_dict() == {"value": None, "n": 0, "ci": None}


def test_win_rate_standard_error_and_interval():
    estimate = stats.win_rate(7, 10)
    assert estimate.value == 0.7
    assert estimate.se == pytest.approx(0.144914, abs=1e-6)  # sqrt(0.7 * 0.3 / 10)
    assert estimate.ci == pytest.approx((0.7 - 1.96 * 0.144914, 0.7 + 1.96 * 0.144914), abs=1e-4)
    assert stats.win_rate(10, 10).ci == (1.0, 1.0)


def test_mean_estimate_uses_the_sample_standard_deviation():
    estimate = stats.mean_estimate([1.0, 2.0, 3.0, 4.0])
    assert estimate.value == 2.5
    assert estimate.se == pytest.approx(math.sqrt((5 / 3) / 4))  # variance (2.25+.25+.25+2.25)/3
    assert stats.mean_estimate([5.0]).ci is None


def test_f1_and_macro_f1():
    truth, predicted = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert stats.f1_score(truth, predicted, 1) == pytest.approx(4 / 6)  # TP 2, FP 1, FN 1
    assert stats.f1_score(truth, predicted, 0) == pytest.approx(2 / 4)  # TP 1, FP 1, FN 1
    assert stats.macro_f1(truth, predicted, [0, 1]) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert stats.f1_score([0, 0], [0, 0], 1) == 0.0
    assert stats.accuracy(truth, predicted) == pytest.approx(3 / 5)


def test_elo_updates_by_hand():
    ratings = stats.elo_ratings([("a", "b")], k=32, start=1000)
    assert ratings == {"a": 1016.0, "b": 984.0}  # expected score 0.5, so the winner gains 32 x 0.5
    ratings = stats.elo_ratings([("a", "b"), ("b", "a")], k=32, start=1000)
    expected_b = 1 / (1 + 10 ** ((1016 - 984) / 400))  # 0.45402
    assert ratings["b"] == pytest.approx(984 + 32 * (1 - expected_b))  # 1001.47
    assert ratings["a"] == pytest.approx(1016 - 32 * (1 - expected_b))  # 998.53
    assert ratings["a"] + ratings["b"] == pytest.approx(2000)


def test_elo_shuffled_averages_orders():
    assert stats.elo_shuffled([("a", "b")], shuffles=5) == {"a": 1016.0, "b": 984.0}
    matches = [("a", "b"), ("b", "a")]
    forward, backward = stats.elo_ratings(matches), stats.elo_ratings(matches[::-1])
    mean = stats.elo_shuffled(matches, shuffles=400, seed=1)
    assert mean["a"] == pytest.approx((forward["a"] + backward["a"]) / 2, abs=0.5)


def test_bradley_terry_maximum_likelihood_by_hand():
    # a beats b twice, b beats a once: p_a / p_b = 2; geometric mean 1 -> p_a = sqrt 2
    ratings = stats.bradley_terry([("a", "b"), ("a", "b"), ("b", "a")], prior=0.0)
    assert ratings["a"] == pytest.approx(1000 + 400 * math.log10(math.sqrt(2)), abs=1e-3)  # 1060.21
    assert ratings["b"] == pytest.approx(1000 - 400 * math.log10(math.sqrt(2)), abs=1e-3)
    cycle = stats.bradley_terry([("a", "b"), ("b", "c"), ("c", "a")], prior=0.0)
    assert all(value == pytest.approx(1000, abs=1e-3) for value in cycle.values())
    unbeaten = stats.bradley_terry([("a", "b")], prior=1.0)
    assert unbeaten["a"] > 1000 > unbeaten["b"] and math.isfinite(unbeaten["a"])
    with pytest.raises(ValueError, match="prior"):
        stats.bradley_terry([("a", "b")], prior=0.0)


def test_percentile_and_bootstrap_interval():
    assert stats.percentile([1, 2, 3, 4], 0.5) == 2.5
    assert stats.percentile([0, 10], 0.25) == 2.5
    mean = lambda sample: sum(sample) / len(sample)  # noqa: E731
    assert stats.bootstrap_interval([2.0, 2.0, 2.0], mean, resamples=20, seed=0) == (2.0, 2.0)
    low, high = stats.bootstrap_interval(list(range(20)), mean, resamples=300, seed=0)
    assert low < 9.5 < high and (low, high) == stats.bootstrap_interval(list(range(20)), mean, 300, 0)
    assert stats.bootstrap_interval([], mean, 10, 0) is None


def test_rating_intervals_contain_the_winner_above_the_loser():
    matches = [("a", "b")] * 8 + [("b", "a")] * 2
    intervals = stats.rating_intervals(matches, lambda m: stats.elo_ratings(m), resamples=200, seed=0)
    assert intervals["a"][0] <= intervals["a"][1] and intervals["b"][0] <= intervals["b"][1]
    assert intervals["a"][1] > 1000 > intervals["b"][0]
    assert sum(intervals["a"]) / 2 > sum(intervals["b"]) / 2
