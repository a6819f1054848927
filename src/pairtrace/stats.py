"""Bootstrap confidence intervals for rates, relative reductions, and the enrichment scan of a ranked list.

When every prompt is sampled many times, the samples of one prompt are not independent: the
right resampling unit is the prompt (a cluster bootstrap). :func:`bootstrap_rate_ci` resamples
clusters when ``clusters`` is given, single observations otherwise. :func:`bootstrap_paired_difference`
compares two models on the same prompts. :func:`min_hypergeometric_test` asks whether some top slice of a
ranking is enriched in a set of items, with a p-value that accounts for having chosen the slice.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import hypergeom

_MAX_WEIGHTS = 2_000_000
"""Upper bound on bootstrap weights held in memory at once (rows x clusters)."""


class _JsonReady:
    """Mixin of the result dataclasses: ``to_dict`` gives their fields with NaN floats as ``None``."""

    def to_dict(self) -> dict:
        """JSON-ready form (NaN becomes ``None``)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


@dataclass(frozen=True)
class RateCI(_JsonReady):
    """A rate with its percentile-bootstrap interval.

    Attributes:
        rate: Observed fraction of true flags (NaN when there are no observations).
        low: Lower end of the interval (NaN when there are no observations).
        high: Upper end of the interval.
        n: Number of observations.
        n_clusters: Number of resampled units (``n`` without clusters).
        confidence: Nominal coverage, ``1 - alpha``.
    """

    rate: float
    low: float
    high: float
    n: int
    n_clusters: int
    confidence: float


def bootstrap_rate_ci(
    flags: Sequence[bool] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence[Hashable] | None = None,
) -> RateCI:
    """Percentile-bootstrap interval for the fraction of true flags.

    Args:
        flags: One boolean per observation (e.g. "this sample was harmful").
        n_boot: Number of bootstrap replicates.
        seed: Seed of the random generator; equal seeds give equal intervals.
        alpha: ``1 - alpha`` is the nominal coverage (0.05 gives a 95% interval).
        clusters: Optional cluster label per observation (e.g. the prompt id). Whole clusters are
            resampled with replacement, and each replicate's rate is pooled over its observations.

    Returns:
        The observed rate and the ``alpha/2`` and ``1 - alpha/2`` percentiles of the replicates.

    Raises:
        ValueError: ``clusters`` does not have one label per flag, or ``n_boot``/``alpha`` is invalid.
    """
    values = np.asarray(flags, dtype=bool).reshape(-1)  # [n]
    n = int(values.size)
    _check_bootstrap_args(n_boot, alpha)
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} labels for {n} flags")
    confidence = 1.0 - alpha
    if n == 0:
        return RateCI(math.nan, math.nan, math.nan, 0, 0, confidence)

    if clusters is None:
        sums = values.astype(np.float64)  # [c]
        sizes = np.ones(n, dtype=np.float64)  # [c]
    else:
        _, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
        sums = np.bincount(inverse, weights=values.astype(np.float64))  # [c]
        sizes = np.bincount(inverse).astype(np.float64)  # [c]
    n_clusters = int(sums.size)
    rng = np.random.default_rng(seed)
    replicates = _resample_rates(sums, sizes, n_boot, rng)  # [n_boot]
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    rate = float(values.mean())
    return RateCI(rate, float(low), float(high), n, n_clusters, confidence)


def _cluster_weights(n_clusters: int, n_boot: int, rng: np.random.Generator):
    """Chunks ``[rows, n_clusters]`` of bootstrap weights: how often each cluster is drawn in a replicate."""
    uniform = np.full(n_clusters, 1.0 / n_clusters)
    rows = max(1, _MAX_WEIGHTS // n_clusters)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        yield start, stop, rng.multinomial(n_clusters, uniform, size=stop - start).astype(np.float64)


def _resample_rates(sums: np.ndarray, sizes: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Rates of ``n_boot`` replicates that draw ``len(sums)`` clusters with replacement."""
    n_clusters = sums.size
    if np.all(sizes == 1.0):
        # Unclustered binary data: the number of true flags in a resample is Binomial(n, p).
        return rng.binomial(n_clusters, sums.mean(), size=n_boot) / n_clusters
    out = np.empty(n_boot, dtype=np.float64)
    for start, stop, weights in _cluster_weights(n_clusters, n_boot, rng):  # weights [rows, c]
        out[start:stop] = (weights @ sums) / (weights @ sizes)
    return out


@dataclass(frozen=True)
class DifferenceCI(_JsonReady):
    """A difference of two rates measured on the same clusters, with its paired-bootstrap interval.

    Attributes:
        difference: ``rate(b) - rate(a)`` over the shared clusters (NaN when none is shared).
        low: Lower end of the interval.
        high: Upper end of the interval.
        n_clusters: Number of clusters both sides observed (the resampled units).
        confidence: Nominal coverage, ``1 - alpha``.
    """

    difference: float
    low: float
    high: float
    n_clusters: int
    confidence: float


def bootstrap_paired_difference(
    a: Mapping[Hashable, Sequence[bool]],
    b: Mapping[Hashable, Sequence[bool]],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> DifferenceCI:
    """Paired percentile-bootstrap interval for ``rate(b) - rate(a)``, resampling shared clusters.

    Two models answered the same prompts; each prompt (cluster) has a few sampled flags per model. A replicate
    draws prompts with replacement and takes *both* models' flags of every drawn prompt, so the prompt-to-prompt
    variation that both share cancels: the interval is much narrower than one built from two independent
    intervals. Clusters that only one side observed are left out.

    Args:
        a: Flags per cluster of the reference (e.g. the baseline retrain).
        b: Flags per cluster of the model compared with it.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the random generator.
        alpha: ``1 - alpha`` is the nominal coverage.

    Returns:
        The observed difference of pooled rates and the ``alpha/2``, ``1 - alpha/2`` percentiles.

    Raises:
        ValueError: ``n_boot`` or ``alpha`` is invalid.
    """
    _check_bootstrap_args(n_boot, alpha)
    shared = sorted((c for c in set(a) & set(b) if len(a[c]) and len(b[c])), key=str)
    if not shared:
        return DifferenceCI(math.nan, math.nan, math.nan, 0, 1.0 - alpha)
    sums = np.array([[sum(map(bool, a[c])), sum(map(bool, b[c]))] for c in shared], dtype=np.float64)  # [c, 2]
    sizes = np.array([[len(a[c]), len(b[c])] for c in shared], dtype=np.float64)  # [c, 2]
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot, dtype=np.float64)
    for start, stop, weights in _cluster_weights(len(shared), n_boot, rng):  # weights [rows, c]
        rates = (weights @ sums) / (weights @ sizes)  # [rows, 2]
        replicates[start:stop] = rates[:, 1] - rates[:, 0]
    observed = sums.sum(0) / sizes.sum(0)  # [2]
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return DifferenceCI(float(observed[1] - observed[0]), float(low), float(high), len(shared), 1.0 - alpha)


def relative_reduction(base: float, new: float) -> float:
    """Fraction by which ``new`` is below ``base``: ``(base - new) / base``.

    A rate going from 7.63% to 2.86% is a reduction of 0.625; a rise gives a negative value.

    Args:
        base: Reference rate (e.g. the retrained baseline's harmful rate).
        new: Rate after the intervention.

    Returns:
        The relative reduction, NaN when ``base`` is 0 or either rate is NaN.
    """
    if base == 0 or math.isnan(base) or math.isnan(new):
        return math.nan
    return (base - new) / base


@dataclass(frozen=True)
class ScanResult(_JsonReady):
    """Outcome of :func:`min_hypergeometric_test`.

    Attributes:
        p_value: Exact probability, under a random order, that some slice of size 1..max_k is at least as
            enriched (as small a tail probability) as the best slice observed.
        best_k: Size of the most enriched top slice (0 when the set has no member).
        best_count: Members of the set inside that slice.
        best_tail: Hypergeometric tail probability of that slice alone (a lower bound on ``p_value``).
    """

    p_value: float
    best_k: int
    best_count: int
    best_tail: float


def min_hypergeometric_test(in_set: Sequence[bool] | np.ndarray, max_k: int) -> ScanResult:
    """Minimum-hypergeometric (mHG) test: is some top slice of a ranked list enriched in a set?

    For every slice size n = 1..max_k the tail probability HGT(n) = P[X >= b_n], X ~ Hypergeometric(N, B, n),
    is computed (b_n members among the first n items; N items, B members in all). The statistic is the smallest
    HGT(n) and its p-value is the exact probability that a uniformly random order reaches a value at least as small
    within the first ``max_k`` items (Eden, Lipson, Yogev & Yakhini, PLoS Comput Biol 2007). It is computed by
    dynamic programming over (n, b), the number of members among the first n items: the probability of every path
    that never enters a cell with HGT <= the observed minimum is the complement of the p-value.

    A fixed top-k test answers "is the top-k enriched?"; this one answers "is some top slice, no larger than
    max_k, enriched?", without knowing in advance how many items are affected. The price of scanning is paid in
    the p-value, which always lies between ``best_tail`` and ``max_k * best_tail``.

    Args:
        in_set: [N] booleans in ranking order (best first): True where the item belongs to the set.
        max_k: Largest slice scanned (clipped to N).

    Returns:
        A :class:`ScanResult`.

    Raises:
        ValueError: ``in_set`` is empty or ``max_k`` is below 1.
    """
    flags = np.asarray(in_set, dtype=bool)
    if flags.ndim != 1 or flags.size == 0:
        raise ValueError("in_set must be a non-empty 1-D sequence of booleans")
    if max_k < 1:
        raise ValueError(f"max_k must be at least 1, got {max_k}")
    n_items, n_members = flags.size, int(flags.sum())
    max_k = min(int(max_k), n_items)
    if n_members in (0, n_items):  # nothing to test: no member, or every item is one
        return ScanResult(1.0, 0 if n_members == 0 else max_k, min(n_members, max_k), 1.0)
    sizes = np.arange(1, max_k + 1)  # [max_k] slice sizes n
    counts = np.cumsum(flags[:max_k])  # [max_k] members among the first n
    tails = hypergeom.sf(counts - 1, n_items, n_members, sizes)  # [max_k] HGT(n)
    best = int(np.argmin(tails))
    observed = float(tails[best])
    if observed >= 1.0:  # no slice holds even one member more than certain: nothing is enriched
        return ScanResult(1.0, best + 1, int(counts[best]), 1.0)
    threshold = observed * (1.0 + 1e-9)  # the observed cell itself counts as "at least as extreme"
    forbidden = _first_forbidden_count(threshold, n_items, n_members, sizes)  # [max_k]
    # alive[b] = P(b members among the first n items and no forbidden cell visited so far)
    alive = np.zeros(n_members + 2)
    alive[0] = 1.0
    for n in range(1, max_k + 1):
        # counts 0..min(n, B) are reachable after n draws, and those from forbidden[n-1] on are cut; the cut only
        # moves up with n, so every count kept now was below the cut one draw ago
        width = min(min(n, n_members) + 1, int(forbidden[n - 1]))
        b = np.arange(width)
        take = np.clip((n_members - b + 1) / (n_items - n + 1), 0.0, 1.0)  # P(next is a member | b - 1 so far)
        stay = np.clip(1.0 - (n_members - b) / (n_items - n + 1), 0.0, 1.0)  # P(next is not | b so far)
        step = alive[:width] * stay
        step[1:] += alive[: width - 1] * take[1:]
        alive[:width] = step  # what would land on the cut is the p-value's share
    p_value = 1.0 - float(alive.sum())
    p_value = min(max(p_value, observed), 1.0, observed * max_k)
    return ScanResult(p_value, best + 1, int(counts[best]), observed)


def _first_forbidden_count(threshold: float, n_items: int, n_members: int, sizes: np.ndarray) -> np.ndarray:
    """For each slice size n, the smallest member count b with P[X >= b] <= threshold (min(n, B) + 1 if none).

    The tail probability falls as b grows, so a bisection on b runs for every n at once.
    """
    low = np.zeros_like(sizes)  # P[X >= 0] = 1 > threshold: never forbidden
    high = np.minimum(sizes, n_members) + 1  # past the largest reachable count: always "forbidden"
    while np.any(unsettled := high - low > 1):
        mid = (low + high) // 2
        forbidden = hypergeom.sf(mid - 1, n_items, n_members, sizes) <= threshold
        high = np.where(unsettled & forbidden, mid, high)
        low = np.where(unsettled & ~forbidden, mid, low)
    return high
