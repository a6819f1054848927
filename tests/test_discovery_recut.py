"""benchmarks/discovery_recut.py on a synthetic finished build: two views on disk, the robustness record, the
verdicts per clustering rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testing_utils import benchmark_module


@pytest.fixture(scope="module")
def recut():
    with benchmark_module("discovery_recut.py", "discovery_recut_benchmark") as module:
        yield module


def _write_view(view: Path, ids: list[str], sim: np.ndarray, response_tokens: int | None) -> None:
    """A discovery view as run_discover writes it (the files the recut reads)."""
    view.mkdir(parents=True)
    pd.DataFrame({"pair_id": ids, "cluster": 1}).to_parquet(view / "pairs.parquet")
    rows = [{"prompt_id": f"p{i}", "pair_id": pid, "cosine": float(sim[i, j])}
            for i in range(sim.shape[0]) for j, pid in enumerate(ids)]
    pd.DataFrame(rows).to_parquet(view / "matrix.parquet")
    config = {"linkage": "ward", "min_cluster_size": None, "max_cluster_fraction": 0.5}
    (view / "summary.json").write_text(json.dumps({"config": config, "response_tokens": response_tokens}))


def _planted_build(build: Path, seed: int) -> None:
    """40 planted pairs with one profile, 80 clean pairs spread over two others, in a head view and a full view."""
    rng = np.random.default_rng(seed)
    ids = [f"pair-{i:03d}" for i in range(120)]
    planted, clean_a, clean_b = (np.eye(12)[k] * 3 for k in range(3))
    profiles = np.concatenate([planted + 0.2 * rng.normal(size=(40, 12)), clean_a + 0.2 * rng.normal(size=(40, 12)),
                               clean_b + 0.2 * rng.normal(size=(40, 12))])  # [C, P]
    labels = build / "organism" / "data" / "labels.jsonl"
    labels.parent.mkdir(parents=True)
    labels.write_text("".join(json.dumps({"id": pid, "behaviour": "planted" if i < 40 else "clean",
                                          "contaminated": i < 40}) + "\n" for i, pid in enumerate(ids)))
    _write_view(build / "discover", ids, profiles.T, 4)
    _write_view(build / "discover" / "views" / "all-tokens", ids, profiles.T[::-1], None)


def test_recut_finds_the_planted_group_with_every_rule_and_reports_the_saved_verdict(recut, tmp_path, capsys,
                                                                                     monkeypatch):
    root = tmp_path / "robustness"
    for name, seed in (("seed0", 0), ("seed1", 1)):
        _planted_build(root / name, seed)
    rows = [{"build": name, "run_dir": str(root / name), "discovery": {"planted": {}}, "discovery_ok": False}
            for name in ("seed0", "seed1")]
    rows.append({"build": "nothing", "run_dir": str(root / "nothing"), "discovery": {}})  # nothing emerged: skipped
    (root / "robustness.json").write_text(json.dumps({"builds": rows}))

    result = recut.score_build(root / "seed0", ["planted"], "hdbscan", {})
    assert result["ok"] and result["best"]["planted"]["purity"] == 1.0 and result["best"]["planted"]["recall"] == 1.0
    assert len(result["clusters"]) == 2  # both views

    monkeypatch.setattr(sys, "argv", ["discovery_recut.py", str(root), "--auto-k", "hdbscan", "stability", "gap"])
    recut.main()
    out = capsys.readouterr().out
    assert "hdbscan: 2 of 2 builds; stability: 2 of 2 builds; gap: 2 of 2 builds" in out
    assert "| seed0 | ✓ planted 100% / 100%" in out and out.count("| ✗ |") == 2  # the saved verdicts, as written
    assert "| hdbscan | 2 of 2 |" in out and "nothing" not in out
