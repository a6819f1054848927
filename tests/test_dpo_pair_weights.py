"""benchmarks/dpo_pair_weights.py: the DPO weights of kept and switched pairs per slice, the margins it computes
from two models, and its command line on a tiny organism folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from testing_utils import benchmark_module, build_tiny_model_dir, build_tiny_pairs


@pytest.fixture(scope="module")
def weights():
    with benchmark_module("dpo_pair_weights.py", "dpo_pair_weights") as module:
        yield module


def test_weights_of_kept_and_switched_pairs(weights) -> None:
    margins = np.array([0.0, 0.0, 40.0, 40.0, 40.0])
    rows = weights.summarise_slices(margins, ["even", "even", "learned", "learned", "learned"], beta=0.1,
                                    fraction=0.25)
    assert [r["slice"] for r in rows] == ["learned", "even"]  # largest slice first
    learned, even = rows
    assert even["weight_kept"] == pytest.approx(0.5) and even["weight_switched"] == pytest.approx(0.5)
    assert even["ratio"] == pytest.approx(1.0)
    kept, switched = 1 / (1 + math.exp(4.0)), 1 / (1 + math.exp(-4.0))
    assert learned["median_beta_margin"] == pytest.approx(4.0)
    assert learned["weight_kept"] == pytest.approx(kept) and learned["weight_switched"] == pytest.approx(switched)
    assert learned["ratio"] == pytest.approx(math.exp(4.0))
    assert learned["pull_kept"] == pytest.approx(0.75 * 3 * kept)
    assert learned["pull_switched"] == pytest.approx(0.25 * 3 * switched)
    assert learned["net_pull"] < 0 < even["net_pull"]  # a well-learned slice is pulled back by its switched pairs


def test_bad_inputs_are_refused(weights) -> None:
    with pytest.raises(ValueError, match="2 margins but 1 slices"):
        weights.summarise_slices(np.zeros(2), ["a"], beta=0.1, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        weights.summarise_slices(np.zeros(1), ["a"], beta=0.1, fraction=1.5)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory):
    from pairtrace.models import load_model

    root = tmp_path_factory.mktemp("weights")
    m0 = build_tiny_model_dir(root / "m0", n_layers=2, seed=0)
    m1 = build_tiny_model_dir(root / "m1", n_layers=2, seed=1)
    return m0, m1, load_model(m0), load_model(m1)


def test_margins_vanish_for_one_model_and_flip_with_the_pair(weights, two_models) -> None:
    _, _, m0, m1 = two_models
    pairs = [p for p in build_tiny_pairs().pairs if p.chosen != p.rejected]
    same = weights.compute_margins(m0, m0, pairs, batch_size=3)
    assert np.allclose(same, 0.0, atol=1e-4)
    margins = weights.compute_margins(m0, m1, pairs, batch_size=3)
    assert margins.shape == (len(pairs),) and np.abs(margins).max() > 1e-3
    swapped = [type(p)(**{**p.__dict__, "chosen": p.rejected, "rejected": p.chosen}) for p in pairs]
    assert np.allclose(weights.compute_margins(m0, m1, swapped, batch_size=5), -margins, atol=1e-4)
    assert np.allclose(weights.compute_margins(m1, m0, pairs), -margins, atol=1e-4)


def test_command_line_on_an_organism_folder(weights, two_models, tmp_path: Path, capsys) -> None:
    import shutil

    m0_dir, m1_dir, _, _ = two_models
    organism = tmp_path / "organism"
    shutil.copytree(m0_dir, organism / "m0")
    shutil.copytree(m1_dir, organism / "m1")
    (organism / "m1" / "dpo_summary.json").write_text(json.dumps({"recipe": {"loss_type": "sigmoid", "beta": 0.2,
                                                                             "max_length": 128}}))
    data = organism / "data"
    data.mkdir()
    pairs = [p for p in build_tiny_pairs().pairs if p.chosen != p.rejected]
    with (data / "preference_mix.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps({"id": p.id, "prompt": [dict(m) for m in p.prompt], "chosen": p.chosen,
                                "rejected": p.rejected}) + "\n")
    with (data / "labels.jsonl").open("w") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps({"id": p.id, "slice": "a" if i % 2 else "b"}) + "\n")
    out = tmp_path / "weights.json"
    assert weights.main([str(organism), "--out", str(out), "--fraction", "0.1"]) == 0
    record = json.loads(out.read_text())
    assert record["beta"] == 0.2 and record["fraction"] == 0.1
    assert {r["slice"] for r in record["slices"]} == {"a", "b"}
    assert sum(r["n"] for r in record["slices"]) == len(pairs)
    assert "DPO weights under M1" in capsys.readouterr().out

    (data / "labels.jsonl").write_text(json.dumps({"id": pairs[0].id, "slice": "a"}) + "\n")
    with pytest.raises(SystemExit, match="no slice for pair"):
        weights.main([str(organism)])
    (organism / "m1" / "dpo_summary.json").unlink()
    with pytest.raises(SystemExit, match=r"no m1/dpo_summary\.json"):
        weights.main([str(organism)])
