"""Seed statistics for comparisons: mean ± standard deviation, and whether a difference exceeds two
standard errors (Welch's, from each side's own spread), the bar a table's plain-language verdict uses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Summary:
    """The values of one metric over seeds."""

    values: tuple

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        if not values:
            raise ValueError("a summary needs at least one value")
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def sd(self) -> float:
        """Sample standard deviation (n - 1); NaN for a single seed, which has no spread to report."""
        if self.n < 2:
            return math.nan
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def standard_error(self) -> float:
        return self.sd / math.sqrt(self.n)

    def text(self, digits: int = 2) -> str:
        spread = "n/a" if math.isnan(self.sd) else f"{self.sd:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {spread}"


@dataclass(frozen=True)
class Difference:
    """a - b, its standard error and whether |a - b| > 2 SE (never decisive with fewer than 2 seeds a side)."""

    value: float
    standard_error: float

    @classmethod
    def between(cls, a: Summary, b: Summary) -> "Difference":
        return cls(a.mean - b.mean, math.sqrt(a.standard_error ** 2 + b.standard_error ** 2))

    @property
    def decisive(self) -> bool:
        if math.isnan(self.standard_error):
            return False
        return abs(self.value) > 2 * self.standard_error

    def text(self, digits: int = 2) -> str:
        verdict = "exceeds 2 SE" if self.decisive else "within 2 SE"
        return f"{self.value:+.{digits}f} (SE {self.standard_error:.{digits}f}, {verdict})"


def verdict(metric: str, name_a: str, a: Summary, name_b: str, b: Summary, lower_is_better: bool,
            digits: int = 2) -> str:
    """One sentence: who is ahead on `metric`, by how much, and whether that exceeds two standard errors."""
    difference = Difference.between(a, b)
    a_better = (difference.value < 0) == lower_is_better
    leader, other = (name_a, name_b) if a_better else (name_b, name_a)
    size, bar = f"{abs(difference.value):.{digits}f}", f"{2 * difference.standard_error:.{digits}f}"
    if difference.decisive:
        return f"{metric}: {leader} is better than {other} by {size} (> 2 SE = {bar})."
    seeds = min(a.n, b.n)
    return f"{metric}: no decision between {name_a} and {name_b} (difference {size} ≤ 2 SE = {bar}, {seeds} seeds)."


@dataclass(frozen=True)
class PairedDifference:
    """a - b per seed (the same seed gave both arms their data order and initialisation), summarised by the mean
    and a t-interval with n - 1 degrees of freedom: the test a study's decision rule reads."""

    differences: tuple

    @classmethod
    def of(cls, a: Sequence[float], b: Sequence[float]) -> "PairedDifference":
        if len(a) != len(b) or not a:
            raise ValueError(f"paired differences need the same seeds on both sides, got {len(a)} and {len(b)} values")
        return cls(tuple(float(x) - float(y) for x, y in zip(a, b)))

    @property
    def summary(self) -> Summary:
        return Summary.of(self.differences)

    def interval(self, confidence: float = 0.95) -> tuple:
        """The two-sided t-interval of the mean difference; (nan, nan) with fewer than 2 seeds."""
        from scipy.stats import t

        s = self.summary
        if s.n < 2:
            return (math.nan, math.nan)
        half = t.ppf(0.5 + confidence / 2, s.n - 1) * s.standard_error
        return (s.mean - half, s.mean + half)

    def sign(self, confidence: float = 0.95) -> int:
        """-1 when the interval lies below 0, +1 above it, 0 when it holds 0 (or cannot be computed)."""
        low, high = self.interval(confidence)
        return -1 if high < 0 else 1 if low > 0 else 0

    def text(self, digits: int = 2, confidence: float = 0.95) -> str:
        low, high = self.interval(confidence)
        return (f"{self.summary.mean:+.{digits}f} (95% CI {low:+.{digits}f} to {high:+.{digits}f}, "
                f"{self.summary.n} paired seeds)")
