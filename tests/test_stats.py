"""Tests for bootstrap rate intervals, relative reductions and the minimum-hypergeometric scan."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pairtrace.stats import (
    bootstrap_paired_difference,
    bootstrap_rate_ci,
    min_hypergeometric_test,
    relative_reduction,
)


def test_rate_and_interval_bracket_the_observed_rate():
    flags = [True] * 30 + [False] * 70
    ci = bootstrap_rate_ci(flags, n_boot=2000, seed=0)
    assert ci.rate == pytest.approx(0.30)
    assert ci.n == 100 and ci.n_clusters == 100 and ci.confidence == pytest.approx(0.95)
    # The normal approximation gives 0.30 +- 0.09; the percentile interval must be close to it.
    assert 0.19 < ci.low < 0.23 and 0.37 < ci.high < 0.41


def test_same_seed_same_interval_and_other_seed_differs():
    rng = np.random.default_rng(1)
    flags = rng.random(200) < 0.2
    clusters = rng.integers(0, 37, size=200)  # unequal cluster sizes: replicate rates are not on a coarse grid
    a = bootstrap_rate_ci(flags, seed=3, clusters=clusters)
    b = bootstrap_rate_ci(flags, seed=3, clusters=clusters)
    c = bootstrap_rate_ci(flags, seed=4, clusters=clusters)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)


def test_cluster_bootstrap_is_wider_when_samples_of_a_prompt_agree():
    # 20 prompts x 50 samples; every sample of a prompt has the same outcome (maximal within-prompt correlation).
    per_prompt = [True] * 4 + [False] * 16
    flags = [flag for flag in per_prompt for _ in range(50)]
    clusters = [f"p{i}" for i in range(20) for _ in range(50)]
    iid = bootstrap_rate_ci(flags, seed=0)
    clustered = bootstrap_rate_ci(flags, seed=0, clusters=clusters)
    assert iid.rate == clustered.rate == pytest.approx(0.2)
    assert clustered.n_clusters == 20 and clustered.n == 1000
    assert (clustered.high - clustered.low) > 3 * (iid.high - iid.low)
    # With 20 independent prompts the interval is roughly 0.2 +- 0.18.
    assert clustered.low <= 0.05 and clustered.high >= 0.35


def test_cluster_bootstrap_weights_unequal_cluster_sizes():
    # One big harmful cluster and many small safe ones: the pooled rate is per observation, not per cluster.
    flags = [True] * 10 + [False] * 10
    clusters = ["big"] * 10 + [f"s{i}" for i in range(10)]
    ci = bootstrap_rate_ci(flags, clusters=clusters, n_boot=500, seed=0)
    assert ci.rate == pytest.approx(0.5)
    assert ci.n_clusters == 11
    assert 0.0 <= ci.low < 0.5 < ci.high <= 1.0


def test_degenerate_inputs():
    empty = bootstrap_rate_ci([])
    assert empty.n == 0 and math.isnan(empty.rate) and math.isnan(empty.low)
    assert empty.to_dict()["rate"] is None
    all_true = bootstrap_rate_ci([True] * 5, clusters=list("abcde"))
    assert (all_true.rate, all_true.low, all_true.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="clusters"):
        bootstrap_rate_ci([True, False], clusters=["a"])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_rate_ci([True], alpha=1.5)


def test_alpha_controls_width():
    flags = [True] * 20 + [False] * 80
    wide = bootstrap_rate_ci(flags, alpha=0.01, seed=0)
    narrow = bootstrap_rate_ci(flags, alpha=0.5, seed=0)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_large_cluster_count_runs_in_chunks():
    rng = np.random.default_rng(0)
    flags = rng.random(30_000) < 0.1
    clusters = np.repeat(np.arange(15_000), 2)
    ci = bootstrap_rate_ci(flags, n_boot=300, seed=0, clusters=clusters)
    assert ci.low < ci.rate < ci.high
    assert ci.high - ci.low < 0.02


@settings(max_examples=60, deadline=None)
@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=60),
    n_clusters=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=10),
)
def test_interval_always_contains_a_valid_rate(flags, n_clusters, seed):
    clusters = [i % n_clusters for i in range(len(flags))]
    ci = bootstrap_rate_ci(flags, n_boot=200, seed=seed, clusters=clusters)
    assert 0.0 <= ci.low <= ci.high <= 1.0
    assert ci.rate == pytest.approx(sum(flags) / len(flags))


def test_relative_reduction():
    assert relative_reduction(0.0763, 0.0286) == pytest.approx(0.625, abs=1e-3)
    assert relative_reduction(0.1, 0.2) == pytest.approx(-1.0)
    assert math.isnan(relative_reduction(0.0, 0.1))
    assert math.isnan(relative_reduction(float("nan"), 0.1))


def test_paired_difference_is_narrower_than_independent_intervals_when_prompts_dominate():
    # 40 prompts: half always answered, half never, by both models; model b also misses one sample on 4 prompts.
    a = {f"p{i}": [i < 20] * 4 for i in range(40)}
    b = {k: list(v) for k, v in a.items()}
    for i in range(4):
        b[f"p{i}"][0] = False
    paired = bootstrap_paired_difference(a, b, seed=0)
    assert paired.n_clusters == 40 and paired.difference == pytest.approx(-4 / 160)
    assert paired.low <= paired.difference <= paired.high <= 0.0
    flat_a = [f for v in a.values() for f in v]
    flat_b = [f for v in b.values() for f in v]
    clusters = [k for k, v in a.items() for _ in v]
    ci_a = bootstrap_rate_ci(flat_a, clusters=clusters, seed=0)
    ci_b = bootstrap_rate_ci(flat_b, clusters=clusters, seed=0)
    assert paired.high - paired.low < 0.25 * ((ci_a.high - ci_a.low) + (ci_b.high - ci_b.low))


def test_paired_difference_uses_shared_prompts_only_and_handles_none():
    a = {"x": [True, True], "y": [False, False], "only_a": [True]}
    b = {"x": [True, False], "y": [False, False], "only_b": [False]}
    ci = bootstrap_paired_difference(a, b, n_boot=200, seed=1)
    assert ci.n_clusters == 2 and ci.difference == pytest.approx(-0.25)
    assert bootstrap_paired_difference(a, {"z": [True]}).to_dict()["difference"] is None
    assert bootstrap_paired_difference(a, a, n_boot=50).to_dict() == {
        "difference": 0.0, "low": 0.0, "high": 0.0, "n_clusters": 3, "confidence": 0.95}
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_paired_difference(a, b, n_boot=0)


def _scan_statistic(flags: np.ndarray, max_k: int) -> float:
    from scipy.stats import hypergeom

    sizes = np.arange(1, max_k + 1)
    return float(hypergeom.sf(np.cumsum(flags)[:max_k] - 1, flags.size, int(flags.sum()), sizes).min())


@pytest.mark.parametrize(("n_items", "n_members", "max_k"), [(10, 3, 10), (10, 3, 4), (12, 5, 6), (9, 1, 9)])
def test_min_hypergeometric_p_value_is_exact_over_every_order(n_items, n_members, max_k):
    import itertools

    orders = []
    for members in itertools.combinations(range(n_items), n_members):
        flags = np.zeros(n_items, dtype=bool)
        flags[list(members)] = True
        orders.append(flags)
    statistics = np.array([_scan_statistic(f, max_k) for f in orders])
    for flags, observed in zip(orders[::7], statistics[::7], strict=True):
        exact = float((statistics <= observed * (1 + 1e-9)).mean())  # share of equally likely orders as extreme
        result = min_hypergeometric_test(flags, max_k)
        assert result.p_value == pytest.approx(exact, abs=1e-12)
        assert result.best_tail == pytest.approx(observed)
        assert result.best_tail <= result.p_value + 1e-15


def test_min_hypergeometric_finds_the_enriched_slice_that_a_wide_top_k_dilutes():
    from scipy.stats import hypergeom

    rng = np.random.default_rng(0)
    flags = np.zeros(1000, dtype=bool)
    flags[:40] = rng.random(40) < 0.5  # about 20 members in the top 40 ...
    flags[40:] = rng.random(960) < 0.1  # ... and a 10% background
    k = 200
    fixed = hypergeom.sf(flags[:k].sum() - 1, flags.size, flags.sum(), k)
    scan = min_hypergeometric_test(flags, k)
    assert scan.best_k <= 60 and scan.best_count == flags[: scan.best_k].sum()
    assert scan.p_value < 1e-3 < fixed  # diluted at k = 200, clear in the scan
    assert scan.p_value <= scan.best_tail * k  # never worse than Bonferroni over the slices


def test_min_hypergeometric_without_signal_and_degenerate_sets():
    rng = np.random.default_rng(1)
    p_values = [min_hypergeometric_test(rng.permutation(np.arange(300) < 30), 60).p_value for _ in range(200)]
    assert 0.02 < np.mean(np.array(p_values) <= 0.1) < 0.2  # about 10% of random orders at the 10% level
    assert min_hypergeometric_test(np.zeros(5, dtype=bool), 3).p_value == 1.0
    assert min_hypergeometric_test(np.ones(5, dtype=bool), 3).p_value == 1.0
    assert min_hypergeometric_test(np.array([True, False]), 10).best_k == 1  # max_k clipped to the list
    with pytest.raises(ValueError, match="max_k"):
        min_hypergeometric_test(np.array([True, False]), 0)
    with pytest.raises(ValueError, match="non-empty"):
        min_hypergeometric_test(np.array([], dtype=bool), 1)
