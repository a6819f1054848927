"""Shared fixtures of the experiment tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pairtrace.experiment import run as run_module
from pairtrace.experiment import validation


def _fake_model_dir(path: Path, fill: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}", encoding="utf-8")
    (path / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}" + fill * 64)
    return path


@pytest.fixture
def local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A run config over local files, with every stage replaced by a recorder of its name."""
    m0 = _fake_model_dir(tmp_path / "m0", b"a")
    m1 = _fake_model_dir(tmp_path / "m1", b"b")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p1", "prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"id": "q1", "prompt": "probe"}) + "\n")
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"id": "e1", "prompt": "eval"}) + "\n")
    config = {
        "models": {"m0": str(m0), "m1": str(m1)},
        "data": {"pairs": str(pairs)},
        "prompts": {"probe": [str(probe)], "eval": [str(evaluation)]},
        "attribution": {"methods": ["probe", "random"]},
        "validation": {"headline_k": 1, "k_values": [1], "headline_methods": ["probe", "random"],
                       "sweep_methods": [], "source_ablation": False, "parallel_retrains": 1},
        "extras": {"discover": True, "sources": False, "steer": True},
    }
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    ran: list[str] = []

    def recorder(name: str, result: Any):
        def fake(*args: Any, **kwargs: Any) -> Any:
            ran.append(name)
            return result
        return fake

    monkeypatch.setattr(run_module, "generate_and_judge", recorder("probe_generations", {"generations": "g"}))
    monkeypatch.setattr(run_module, "build_triples", recorder("triples", {"n_triples": 1, "path": "t"}))
    monkeypatch.setattr(run_module, "rank_pairs", recorder("rankings", {"n_pairs": 1, "layer": 1,
                                                                         "rankings": {}}))
    monkeypatch.setattr(run_module, "discover", recorder("discover", {}))
    monkeypatch.setattr(run_module, "steer_check", recorder("steer", {}))
    monkeypatch.setattr(run_module, "collect_results", lambda *a, **k: {"headline_k": 1, "interventions": [],
                                                                        "baseline": {}})
    monkeypatch.setattr(run_module, "render_tables", lambda results: "")
    monkeypatch.setattr("pairtrace.report.write_report", lambda out: None)
    monkeypatch.setattr(validation, "retrain_and_evaluate", lambda ctx, unit: ran.append(f"retrain-{unit.name}"))
    return {"config": config_path, "pairs": pairs, "eval": evaluation, "m0": m0, "m1": m1, "out": tmp_path / "out",
            "ran": ran}
