"""The statistics behind every number in the report: estimates with n and a confidence interval.

    proportion(7, 10)            share with a Wilson 95% interval
    win_rate(7, 10)              share with its standard error sqrt(p(1-p)/n) and p +- 1.96 SE
    mean_estimate([...])         mean, standard error, normal interval
    jackknife_estimate(...)      a pooled statistic with a leave-one-out standard error and normal interval
    bootstrap_interval(...)      percentile interval of any statistic over resampled items
    f1_score / macro_f1          classifier quality
    elo_ratings / elo_shuffled   Elo from `start` with factor K; averaged over shuffled match orders
    bradley_terry                maximum-likelihood strengths (MM algorithm), on the Elo scale

A match is a `(winner, loser)` pair of names. Pure Python: no numpy/scipy needed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence, TypeVar

Z95 = 1.959963984540054
Match = tuple[str, str]
Item = TypeVar("Item")


@dataclass(frozen=True)
class Estimate:
    """One reported number: its value, how many observations it rests on, and a 95% interval."""

    value: float | None
    n: int
    ci: tuple[float, float] | None = None
    se: float | None = None

    def to_dict(self) -> dict:
        """JSON form: {value, n, ci: [low, high] | null, se?}."""
        out: dict = {"value": self.value, "n": self.n, "ci": list(self.ci) if self.ci else None}
        if self.se is not None:
            out["se"] = self.se
        return out


def empty_estimate() -> Estimate:
    """The estimate of a measure with no observations."""
    return Estimate(value=None, n=0, ci=None)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        raise ValueError("no observations")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> Estimate:
    """A share with its Wilson 95% interval and binomial standard error."""
    if n == 0:
        return empty_estimate()
    p = successes / n
    return Estimate(value=p, n=n, ci=wilson_interval(successes, n), se=math.sqrt(p * (1 - p) / n))


def win_rate(wins: float, n: int) -> Estimate:
    """Win share with standard error sqrt(p(1-p)/n) and the normal interval p +- 1.96 SE (clipped to [0, 1])."""
    if n == 0:
        return empty_estimate()
    p = wins / n
    se = math.sqrt(p * (1 - p) / n)
    return Estimate(value=p, n=n, ci=(max(0.0, p - Z95 * se), min(1.0, p + Z95 * se)), se=se)


def mean_estimate(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean with standard error (sample sd / sqrt n) and a normal 95% interval (clipped to `bounds`); one value has none."""
    n = len(values)
    if n == 0:
        return empty_estimate()
    mean = sum(values) / n
    if n == 1:
        return Estimate(value=mean, n=1, ci=None)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    se = math.sqrt(variance / n)
    return Estimate(value=mean, n=n, ci=_clip((mean - Z95 * se, mean + Z95 * se), bounds), se=se)


def _clip(interval: tuple[float, float], bounds: tuple[float, float] | None) -> tuple[float, float]:
    if bounds is None:
        return interval
    return max(bounds[0], interval[0]), min(bounds[1], interval[1])


def jackknife_estimate(items: Sequence[Item], statistic: Callable[[Sequence[Item]], float | None],
                       bounds: tuple[float, float] | None = None) -> Estimate:
    """A statistic of the whole sample with its leave-one-out jackknife standard error and normal 95% interval.

    For statistics of a pooled sample (e.g. distinct n-grams over all answers) a bootstrap
    misleads: resampling with replacement duplicates items, which can only lower such a ratio.
    """
    value = statistic(items) if items else None
    if value is None:
        return empty_estimate()
    n = len(items)
    left_out = [statistic(list(items[:i]) + list(items[i + 1:])) for i in range(n)] if n > 1 else []
    left_out = [v for v in left_out if v is not None]
    if len(left_out) < 2:
        return Estimate(value=value, n=n, ci=None)
    centre = sum(left_out) / len(left_out)
    se = math.sqrt((len(left_out) - 1) / len(left_out) * sum((v - centre) ** 2 for v in left_out))
    return Estimate(value=value, n=n, ci=_clip((value - Z95 * se, value + Z95 * se), bounds), se=se)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 1]) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bootstrap_interval(items: Sequence[Item], statistic: Callable[[Sequence[Item]], float | None],
                       resamples: int, seed: int, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of `statistic` over `resamples` resamples of `items` with replacement."""
    if not items:
        return None
    rng = random.Random(seed)
    values = sorted(v for v in (statistic(rng.choices(items, k=len(items))) for _ in range(resamples))
                    if v is not None)
    if not values:
        return None
    tail = (1 - level) / 2
    return percentile(values, tail), percentile(values, 1 - tail)


# ----------------------------------------------------------------------------- classification
def f1_score(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], positive: Hashable) -> float:
    """F1 of the `positive` class: 2 TP / (2 TP + FP + FN); 0 when the class is never true nor predicted."""
    tp = sum(t == positive and p == positive for t, p in zip(y_true, y_pred))
    fp = sum(t != positive and p == positive for t, p in zip(y_true, y_pred))
    fn = sum(t == positive and p != positive for t, p in zip(y_true, y_pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Unweighted mean of the per-class F1 over `labels`."""
    return sum(f1_score(y_true, y_pred, label) for label in labels) / len(labels)


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Share of predictions equal to the truth."""
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


# ----------------------------------------------------------------------------- ratings
def elo_ratings(matches: Sequence[Match], k: float = 32.0, start: float = 1000.0) -> dict[str, float]:
    """Sequential Elo: each match moves winner and loser by K x (1 - expected score of the winner)."""
    ratings: dict[str, float] = {}
    for winner, loser in matches:
        rw, rl = ratings.setdefault(winner, start), ratings.setdefault(loser, start)
        expected_winner = 1.0 / (1.0 + 10 ** ((rl - rw) / 400.0))
        delta = k * (1.0 - expected_winner)
        ratings[winner], ratings[loser] = rw + delta, rl - delta
    return ratings


def elo_shuffled(matches: Sequence[Match], k: float = 32.0, start: float = 1000.0, shuffles: int = 20,
                 seed: int = 0) -> dict[str, float]:
    """Elo averaged over `shuffles` random orders of the matches (Elo depends on order; the mean less so)."""
    rng = random.Random(seed)
    totals: dict[str, float] = {}
    for _ in range(shuffles):
        order = list(matches)
        rng.shuffle(order)
        for player, rating in elo_ratings(order, k, start).items():
            totals[player] = totals.get(player, 0.0) + rating
    return {player: total / shuffles for player, total in totals.items()}


def bradley_terry(matches: Sequence[Match], prior: float = 1.0, iterations: int = 1000, tolerance: float = 1e-7,
                  start: float = 1000.0) -> dict[str, float]:
    """Bradley-Terry strengths by the MM algorithm (Hunter 2004), as Elo-scale ratings around `start`.

    P(i beats j) = p_i / (p_i + p_j). `prior` adds that many virtual wins and losses of each player
    against a fixed opponent of strength 1, so a player who never lost still gets a finite rating
    (0 = plain maximum likelihood). Strengths are normalised to geometric mean 1 and reported as
    start + 400 log10(p), so a 2:1 favourite sits about 120 points above its opponent, as in Elo.
    """
    import numpy as np

    players = sorted({name for match in matches for name in match})
    if not players:
        return {}
    index = {name: i for i, name in enumerate(players)}
    winners = np.array([index[w] for w, _ in matches], dtype=np.int64)
    losers = np.array([index[l] for _, l in matches], dtype=np.int64)
    wins = np.bincount(winners, minlength=len(players)) + prior
    if not wins.all():
        raise ValueError("with prior 0 a player who never won has no finite rating: use prior > 0")
    strength = np.ones(len(players))
    for _ in range(iterations):
        per_game = 1.0 / (strength[winners] + strength[losers])
        games = np.bincount(winners, per_game, len(players)) + np.bincount(losers, per_game, len(players))
        updated = wins / (games + 2 * prior / (strength + 1.0))
        updated /= np.exp(np.log(updated).mean())
        converged = np.max(np.abs(updated - strength)) < tolerance
        strength = updated
        if converged:
            break
    return {name: start + 400.0 * math.log10(strength[index[name]]) for name in players}


def rating_intervals(matches: Sequence[Match], fit: Callable[[Sequence[Match]], dict[str, float]],
                     resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Per-player percentile 95% interval of `fit` over bootstrap resamples of the matches."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        for player, rating in fit(rng.choices(matches, k=len(matches))).items():
            samples.setdefault(player, []).append(rating)
    return {player: (percentile(sorted(values), 0.025), percentile(sorted(values), 0.975))
            for player, values in samples.items()}
