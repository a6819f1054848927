"""How well does discovery recover planted behaviours? Clustering rules compared on synthetic vectors.

Reproduces the planted-data tables of docs/discovery.md ("Choices, and the measurements behind them"). Generator:
d = 128; three planted behaviour directions b_i, a shared shift c and 4 topic directions (random unit vectors).
Behaviour vectors: 8 prompts per behaviour, v_p = b_i + c + 0.5ε, and 8 prompts with no behaviour, c + ε.
Datapoint vectors: 30 planted pairs per behaviour, v_d = s·b_i + c' + t·u·topic + n·ε (a random topic), and 300
clean pairs, c' + t·u·topic + n·ε (topics in turn); u ~ U(0.5, 1.5), ε ~ N(0, I/d). c' = c except in the
*unaligned* setting, where the pairs' shift is another random unit vector. Defaults s = 1, t = 1.5, n = 1.5;
*weak*: s = 0.6; *noisy*: n = 3; *topics*: t = 3.

Each method is a :class:`~pairtrace.discover.DiscoverConfig` passed to
:func:`~pairtrace.clustering.discover_clusters`, on two column sets: the union of each prompt's top-30 pairs by
cosine, and all 390 pairs. The score is the mean over the planted behaviours of the F1 of the best-matching pair
cluster (1.0 = every planted pair of a behaviour among the columns in one cluster, with nothing else), averaged
over seeds. A second table gives the mean number of pair clusters chosen (true number: 4, three behaviours + clean).
Tables are printed in markdown.

Run::

    .venv/bin/python benchmarks/discovery_planted.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pairtrace.clustering import discover_clusters
from pairtrace.discover import DiscoverConfig
from pairtrace.discover_matrix import PromptResponses

DIM = 128
N_BEHAVIOURS = 3
N_TOPICS = 4
PROMPTS_PER_BEHAVIOUR = 8
PAIRS_PER_BEHAVIOUR = 30
N_CLEAN = 300

METHODS: dict[str, DiscoverConfig] = {
    "profile, HDBSCAN": DiscoverConfig(auto_k="hdbscan"),
    "profile, stability": DiscoverConfig(auto_k="stability"),
    "profile, gap": DiscoverConfig(auto_k="gap"),
    "profile, CH": DiscoverConfig(auto_k="calinski_harabasz"),
    "profile, silhouette": DiscoverConfig(auto_k="silhouette"),
    "vector, gap": DiscoverConfig(cluster_pairs_on="vector", auto_k="gap"),
    "vector, HDBSCAN": DiscoverConfig(cluster_pairs_on="vector", auto_k="hdbscan"),
    "vector, stability": DiscoverConfig(cluster_pairs_on="vector", auto_k="stability"),
    "profile, average (gap)": DiscoverConfig(linkage="average", auto_k="gap"),
    "profile, k = 4": DiscoverConfig(n_clusters=4),
    "vector, k = 4": DiscoverConfig(cluster_pairs_on="vector", n_clusters=4),
}


@dataclass(frozen=True)
class Setting:
    """One generator setting.

    Attributes:
        name: Row name in the tables.
        strength: s, the weight of the behaviour direction in planted pairs.
        topic: t, the weight of the topic direction in every pair.
        noise: n, the weight of the isotropic noise in every pair.
        aligned: Whether the pairs share the behaviour vectors' shift (c' = c).
    """

    name: str
    strength: float = 1.0
    topic: float = 1.5
    noise: float = 1.5
    aligned: bool = True


SETTINGS = (
    Setting("base"),
    Setting("unaligned", aligned=False),
    Setting("weak", strength=0.6),
    Setting("noisy", noise=3.0),
    Setting("topics", topic=3.0),
)


@dataclass
class Planted:
    """Synthetic behaviour vectors and datapoint vectors.

    Attributes:
        behaviour: ``[P, d]`` behaviour vectors (float32).
        datapoints: ``[C, d]`` datapoint vectors (float32).
        truth: ``[C]`` planted behaviour of each pair, -1 for clean pairs.
    """

    behaviour: torch.Tensor
    datapoints: torch.Tensor
    truth: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def generate(seed: int, setting: Setting, d: int = DIM) -> Planted:
    """Draw the planted data of one seed and setting.

    The same seed draws the same directions in every setting, so settings differ only by their parameters.

    Args:
        seed: Random seed.
        setting: Weights of the generator.
        d: Dimension of the vectors.

    Returns:
        The behaviour vectors, the datapoint vectors and the planted behaviour of each pair.
    """
    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        return rng.normal(size=d) / np.sqrt(d)

    directions = _unit(rng.normal(size=(N_BEHAVIOURS, d)))
    shift = _unit(rng.normal(size=d))
    topics = _unit(rng.normal(size=(N_TOPICS, d)))
    other_shift = _unit(rng.normal(size=d))
    pair_shift = shift if setting.aligned else other_shift

    behaviour = [b + shift + 0.5 * noise() for b in directions for _ in range(PROMPTS_PER_BEHAVIOUR)]
    behaviour += [shift + noise() for _ in range(PROMPTS_PER_BEHAVIOUR)]

    def pair(topic: np.ndarray) -> np.ndarray:
        return pair_shift + setting.topic * rng.uniform(0.5, 1.5) * topic + setting.noise * noise()

    datapoints, truth = [], []
    for i, b in enumerate(directions):
        for _ in range(PAIRS_PER_BEHAVIOUR):
            datapoints.append(setting.strength * b + pair(topics[rng.integers(N_TOPICS)]))
            truth.append(i)
    for j in range(N_CLEAN):
        datapoints.append(pair(topics[j % N_TOPICS]))
        truth.append(-1)
    as_tensor = lambda rows: torch.tensor(np.array(rows), dtype=torch.float32)  # noqa: E731
    return Planted(as_tensor(behaviour), as_tensor(datapoints), np.array(truth))


def top_k_union(behaviour: torch.Tensor, datapoints: torch.Tensor, k: int) -> np.ndarray:
    """Indices (ascending) of the union of each behaviour vector's ``k`` pairs of highest cosine."""
    cosine = _unit(behaviour.numpy()) @ _unit(datapoints.numpy()).T  # [P, C]
    top = np.argsort(-cosine, axis=1)[:, :k]
    return np.unique(top)


def all_pairs(behaviour: torch.Tensor, datapoints: torch.Tensor) -> np.ndarray:
    """Indices of every pair."""
    return np.arange(len(datapoints))


def best_f1(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the planted behaviours of the F1 of the best-matching cluster.

    Args:
        labels: ``[C]`` cluster of each column.
        truth: ``[C]`` planted behaviour of each column, -1 for clean pairs.

    Returns:
        The mean F1; a behaviour with no pair among the columns counts 0.
    """
    scores = []
    for b in range(N_BEHAVIOURS):
        members = truth == b
        best = 0.0
        for cluster in np.unique(labels[members]):
            hits = int((labels[members] == cluster).sum())
            precision, recall = hits / int((labels == cluster).sum()), hits / int(members.sum())
            best = max(best, 2 * precision * recall / (precision + recall))
        scores.append(best)
    return float(np.mean(scores))


def run_method(data: Planted, columns: np.ndarray, config: DiscoverConfig) -> tuple[float, int]:
    """Cluster the chosen columns with one configuration.

    Args:
        data: The planted data.
        columns: Indices of the pairs used as columns.
        config: The discovery settings.

    Returns:
        ``(F1, number of pair clusters)``.
    """
    n_prompts = len(data.behaviour)
    prompts = [PromptResponses(f"q{i}", f"prompt {i}", ["m0"], ["m1"]) for i in range(n_prompts)]
    pair_ids = [f"d{i}" for i in columns]
    index = torch.from_numpy(columns)
    discovery = discover_clusters(prompts, data.behaviour, pair_ids, data.datapoints[index], config)
    return best_f1(discovery.columns.labels, data.truth[columns]), discovery.columns.n_clusters


@dataclass
class Cell:
    """Sums over seeds for one setting and method."""

    f1: float = 0.0
    k: float = 0.0
    seconds: float = 0.0
    count: int = 0

    def add(self, f1: float, k: int, seconds: float) -> None:
        """Add one seed's result."""
        self.f1 += f1
        self.k += k
        self.seconds += seconds
        self.count += 1


Selector = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def measure(seeds: Sequence[int], select: Selector) -> dict[tuple[str, str], Cell]:
    """F1, cluster count and time of every method in every setting, summed over seeds.

    Args:
        seeds: Seeds of the generator.
        select: Chooses the column indices from the behaviour and datapoint vectors.

    Returns:
        ``{(setting, method): Cell}``.
    """
    cells = {(s.name, m): Cell() for s in SETTINGS for m in METHODS}
    for setting in SETTINGS:
        for seed in seeds:
            data = generate(seed, setting)
            columns = select(data.behaviour, data.datapoints)
            for method, config in METHODS.items():
                start = time.perf_counter()
                f1, k = run_method(data, columns, config)
                cells[setting.name, method].add(f1, k, time.perf_counter() - start)
    return cells


def table(cells: dict[tuple[str, str], Cell], value: Callable[[Cell], str]) -> str:
    """A markdown table: one row per setting, one column per method."""
    lines = ["| setting | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for setting in SETTINGS:
        lines.append(f"| {setting.name} | " + " | ".join(value(cells[setting.name, m]) for m in METHODS) + " |")
    return "\n".join(lines)


def report(title: str, cells: dict[tuple[str, str], Cell]) -> None:
    """Print the F1 table, the cluster-count table and the time per method of one column set."""
    print(f"Columns = {title}, mean F1 of the best-matching cluster:\n")
    print(table(cells, lambda c: f"{c.f1 / c.count:.2f}"))
    print(f"\nColumns = {title}, mean number of pair clusters (true: {N_BEHAVIOURS + 1}):\n")
    print(table(cells, lambda c: f"{c.k / c.count:.1f}"))
    seconds = {m: sum(cells[s.name, m].seconds for s in SETTINGS) for m in METHODS}
    print("\nSeconds per method (all settings and seeds): "
          + ", ".join(f"{m} {t:.1f}" for m, t in seconds.items()) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="Seeds 0..N-1 per setting (default 5).")
    parser.add_argument("--top-k", type=int, default=30, help="Pairs kept per prompt in the top-K union.")
    args = parser.parse_args()

    start = time.perf_counter()
    seeds = range(args.seeds)
    n_pairs = N_BEHAVIOURS * PAIRS_PER_BEHAVIOUR + N_CLEAN
    column_sets: dict[str, Selector] = {
        f"union of each prompt's top-{args.top_k} pairs": lambda b, x: top_k_union(b, x, args.top_k),
        f"all {n_pairs} pairs": all_pairs,
    }
    for title, select in column_sets.items():
        report(title, measure(seeds, select))

    print("Settings: " + "; ".join(
        f"{s.name}: s = {s.strength}, t = {s.topic}, n = {s.noise}, c' {'= c' if s.aligned else '!= c'}"
        for s in SETTINGS))
    print(f"d = {DIM}, {PROMPTS_PER_BEHAVIOUR} prompts per behaviour (+ {PROMPTS_PER_BEHAVIOUR} without), "
          f"{PAIRS_PER_BEHAVIOUR} planted pairs per behaviour, {N_CLEAN} clean pairs, {N_TOPICS} topics; "
          f"seeds 0..{args.seeds - 1}")
    print(f"Wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
