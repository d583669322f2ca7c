"""Review statistics: mean scores with t intervals, pairwise win rates with Wilson intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from magicid.errors import ReviewError

Z_95 = 1.959963984540054  # standard normal 97.5% quantile


@dataclass(frozen=True)
class ScoreSummary:
    """Mean of n scores with a 95% t interval (lo, hi are None below 2 scores)."""

    n: int
    mean: float | None
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class WinRate:
    """Blind judgements of `version` against `opponent`: ties count half a win; 95% Wilson interval."""

    version: str
    opponent: str
    wins: int
    losses: int
    ties: int
    rate: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


@dataclass(frozen=True)
class VersionAggregate:
    model_version: str
    n_generations: int
    n_rated_generations: int
    n_ratings: int
    n_reviewers: int
    overall: ScoreSummary
    identity: ScoreSummary
    flag_counts: dict[str, int] = field(default_factory=dict)
    win_vs_champion: WinRate | None = None


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n` (successes may be fractional: ties).

    Raises:
        ReviewError: n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ReviewError(f"Wilson interval needs n >= 1 and 0 <= successes <= n, got {successes}/{n}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(n: int, total: float, total_sq: float) -> ScoreSummary:
    """Mean and 95% t interval from the count, sum and sum of squares of scores."""
    if n == 0:
        return ScoreSummary(0, None, None, None)
    mean = total / n
    if n < 2:
        return ScoreSummary(n, mean, None, None)
    from scipy.stats import t

    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * math.sqrt(variance / n)
    return ScoreSummary(n, mean, mean - half, mean + half)


def win_rate_from_counts(version: str, opponent: str, wins: int, losses: int, ties: int) -> WinRate:
    n = wins + losses + ties
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return WinRate(version, opponent, wins, losses, ties, (wins + 0.5 * ties) / n, lo, hi)
