"""todi.stats against exact references: the bootstrap by full enumeration, the sign test by counting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from todi.stats import bootstrap_mean_ci, markdown_paired_table, paired_by_key, paired_difference, sign_test


def _exact_bootstrap_cdf(values: list[float], x: float) -> float:
    """P(mean of a resample <= x), enumerating all n**n equally likely resamples."""
    n = len(values)
    hits = sum(sum(values[i] for i in idx) / n <= x + 1e-12 for idx in itertools.product(range(n), repeat=n))
    return hits / n**n


def test_bootstrap_interval_matches_exact_resampling_distribution():
    values = [0.3, 1.7, -0.4, 2.9, 0.8, 1.1]
    mean, low, high = bootstrap_mean_ci(values, level=0.9, resamples=20_000, seed=3)
    assert mean == pytest.approx(sum(values) / len(values), abs=1e-12)
    # The percentile interval's ends sit at the 5% and 95% points of the exact resampling distribution.
    assert _exact_bootstrap_cdf(values, low) == pytest.approx(0.05, abs=0.012)
    assert _exact_bootstrap_cdf(values, high) == pytest.approx(0.95, abs=0.012)


def test_bootstrap_is_reproducible_and_degenerate_cases():
    v = list(np.random.default_rng(0).normal(size=10))
    assert bootstrap_mean_ci(v, seed=7) == bootstrap_mean_ci(v, seed=7)
    assert bootstrap_mean_ci([2.5]) == (2.5, 2.5, 2.5)
    assert bootstrap_mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0, 2.0], level=1.5)


@pytest.mark.parametrize("wins,losses", [(9, 1), (10, 0), (5, 5), (7, 2), (0, 3), (0, 0), (12, 4)])
def test_sign_test_equals_counting_all_sign_patterns(wins, losses):
    n = wins + losses
    if n == 0:
        assert sign_test(0, 0) == 1.0
        return
    observed = abs(wins - n / 2)
    extreme = sum(abs(k - n / 2) >= observed - 1e-12 for k in range(n + 1) for _ in range(math.comb(n, k)))
    assert sign_test(wins, losses) == pytest.approx(min(1.0, extreme / 2**n), rel=1e-12)


def test_sign_test_known_value():
    assert sign_test(9, 1) == pytest.approx(22 / 1024)


def test_paired_difference_counts_and_sentence():
    todi = [31.0, 29.5, 33.2, 30.1, 28.7, 32.0, 30.9, 29.8, 31.5, 30.4]
    rkl = [t - d for t, d in zip(todi, [2.1, 1.5, 3.0, 2.2, 0.9, 2.8, 1.7, -0.3, 2.5, 1.9], strict=True)]
    d = paired_difference(todi, rkl, name="ToDi", reference="RKL")
    diffs = np.array(todi) - np.array(rkl)
    assert d.mean == pytest.approx(diffs.mean())
    assert (d.wins, d.losses, d.ties, d.n) == (9, 1, 0, 10)
    assert d.detected and d.low > 0
    assert d.sentence().startswith(f"ToDi beats RKL by +{diffs.mean():.1f} (95% CI +")
    # The same comparison the other way round names the same winner.
    flipped = paired_difference(rkl, todi, name="RKL", reference="ToDi")
    assert flipped.sentence().startswith(f"ToDi beats RKL by +{diffs.mean():.1f}")


def test_overlapping_noise_reads_as_no_difference():
    rng = np.random.default_rng(1)
    a = list(rng.normal(30, 5, size=5))
    b = [x + e for x, e in zip(a, rng.normal(0, 3, size=5), strict=True)]
    d = paired_difference(a, b, name="A", reference="B")
    if not d.detected:
        assert d.sentence().startswith("no difference detected between A and B")
    assert d.low <= d.mean <= d.high


def test_pairs_by_seed_and_refuses_mismatch():
    d = paired_by_key({10: 3.0, 20: 5.0, 30: 4.0}, {20: 4.0, 10: 1.0, 40: 9.0}, name="x", reference="y")
    assert d.n == 2 and d.mean == pytest.approx(1.5)
    with pytest.raises(ValueError, match="share no seed"):
        paired_by_key({1: 1.0}, {2: 1.0}, name="x", reference="y")
    with pytest.raises(ValueError, match="same number of pairs"):
        paired_difference([1.0, 2.0], [1.0], name="x", reference="y")


def test_markdown_table_has_one_row_per_comparison():
    ds = [
        paired_difference([1, 2, 3], [0, 1, 1], name="a", reference="r"),
        paired_difference([1, 2], [1, 2], name="b", reference="r"),
    ]
    table = markdown_paired_table(ds)
    assert (
        table.count("\n") == 3 and "| a − r |" in table and "no difference detected between b and r" in table
    )


def test_one_pair_never_detects_a_difference():
    d = paired_difference([31.0], [28.0], name="a", reference="r")
    assert (d.mean, d.low, d.high) == (3.0, 3.0, 3.0)
    assert not d.detected and d.sentence().startswith("no difference detected between a and r")
