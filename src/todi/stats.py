"""Paired statistics for comparing objectives: the one module every report uses.

Two objectives trained with the same seeds and data order are compared seed by seed: the per-seed
difference removes the variation the seeds share (a lucky data order lifts both), which is why a paired
difference can separate objectives whose mean ± std ranges overlap. The interval is a percentile
bootstrap over the pairs; the sign test counts how many pairs each side wins and needs no assumption
about the distribution. With few pairs (5 or 10 seeds) both are coarse: the sentence says "no
difference detected" unless the interval excludes 0, never "equal".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000


def bootstrap_mean_ci(
    values: Sequence[float], *, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap interval at ``level``, reproducible from ``seed``.

    One value gives a zero-width interval: there is nothing to resample, and a report should show that
    rather than an error.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_mean_ci needs a non-empty 1-d sequence, got shape {tuple(x.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test p-value; ties are left out, as the test prescribes."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """``name`` minus ``reference``, pair by pair: mean, bootstrap interval, and the sign-test counts."""

    name: str
    reference: str
    n: int
    mean: float
    low: float
    high: float
    level: float
    wins: int  # pairs where ``name`` scored higher
    losses: int
    ties: int
    sign_p: float

    @property
    def detected(self) -> bool:
        """Whether the interval excludes zero (a difference the pairs can tell apart); never from one pair,
        whose interval has zero width whatever the noise."""
        return self.n >= 2 and (self.low > 0.0 or self.high < 0.0)

    def sentence(self, digits: int = 1) -> str:
        """The comparison in words, e.g. "ToDi beats RKL by +2.3 (95% CI +0.4..+4.1; 9 of 10 seeds)"."""
        pct = f"{round(self.level * 100)}% CI"
        if not self.detected:
            return (
                f"no difference detected between {self.name} and {self.reference} "
                f"({self.name} − {self.reference} = {self.mean:+.{digits}f}, {pct} "
                f"{self.low:+.{digits}f}..{self.high:+.{digits}f}; n = {self.n})"
            )
        if self.mean > 0:
            better, worse, diff, lo, hi, won = (
                self.name,
                self.reference,
                self.mean,
                self.low,
                self.high,
                self.wins,
            )
        else:
            better, worse, diff, lo, hi, won = (
                self.reference,
                self.name,
                -self.mean,
                -self.high,
                -self.low,
                self.losses,
            )
        return (
            f"{better} beats {worse} by {diff:+.{digits}f} ({pct} {lo:+.{digits}f}..{hi:+.{digits}f}; "
            f"{won} of {self.n} pairs, sign test p = {self.sign_p:.3g})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "detected": self.detected, "sentence": self.sentence()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedDifference:
        """The inverse of :meth:`as_dict` (its derived keys are recomputed, not read)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def paired_difference(
    values: Sequence[float],
    reference_values: Sequence[float],
    *,
    name: str,
    reference: str,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Compare ``values`` with ``reference_values``, which must be paired (same seeds, same order)."""
    if len(values) != len(reference_values):
        raise ValueError(
            f"paired comparison of {name} with {reference} needs the same number of pairs, "
            f"got {len(values)} and {len(reference_values)}"
        )
    diffs = [float(a) - float(b) for a, b in zip(values, reference_values, strict=True)]
    mean, low, high = bootstrap_mean_ci(diffs, level=level, resamples=resamples, seed=seed)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    return PairedDifference(
        name=name,
        reference=reference,
        n=len(diffs),
        mean=mean,
        low=low,
        high=high,
        level=level,
        wins=wins,
        losses=losses,
        ties=len(diffs) - wins - losses,
        sign_p=sign_test(wins, losses),
    )


def paired_by_key(
    scores: dict[Any, float], reference_scores: dict[Any, float], *, name: str, reference: str, **kwargs: Any
) -> PairedDifference:
    """``paired_difference`` over the keys (seeds) both sides have; refuses when they share none."""
    keys = sorted(set(scores) & set(reference_scores), key=str)
    if not keys:
        raise ValueError(
            f"{name} and {reference} share no seed to pair: {sorted(scores)} vs {sorted(reference_scores)}"
        )
    return paired_difference(
        [scores[k] for k in keys],
        [reference_scores[k] for k in keys],
        name=name,
        reference=reference,
        **kwargs,
    )


def markdown_paired_table(diffs: Sequence[PairedDifference], unit: str = "", digits: int = 1) -> str:
    """One row per comparison: mean difference, interval, wins/losses/ties, sign test, and the sentence."""
    head = (
        f"| comparison | mean difference{unit} | {round(diffs[0].level * 100) if diffs else 95}% CI "
        "| wins / losses / ties | sign test p | reading |\n|---|---|---|---|---|---|"
    )
    rows = [
        f"| {d.name} − {d.reference} | {d.mean:+.{digits}f} | {d.low:+.{digits}f}..{d.high:+.{digits}f} "
        f"| {d.wins} / {d.losses} / {d.ties} | {d.sign_p:.3g} | {d.sentence(digits)} |"
        for d in diffs
    ]
    return "\n".join([head, *rows])
