"""The run's stage cache: chained keys with content digests, so an edited local input file reruns exactly the
stages that read it. The stages themselves are replaced by recorders here; the real ones run in test_run.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pairtrace.experiment import run as run_module
from pairtrace.experiment import validation
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.run_config import load_run_config
from pairtrace.stage_cache import StageCache, chain_key, file_digest


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
    return {"config": config_path, "pairs": pairs, "eval": evaluation, "m1": m1, "out": tmp_path / "out",
            "ran": ran}


def _run(local_run: dict[str, Any]) -> list[str]:
    local_run["ran"].clear()
    ctx = RunContext(load_run_config(local_run["config"]), local_run["out"], progress=False)
    run_module.execute(ctx)
    return sorted(local_run["ran"])


def test_editing_the_pairs_file_reruns_exactly_the_stages_that_read_it(local_run: dict[str, Any]) -> None:
    every = _run(local_run)
    assert every == sorted(["probe_generations", "triples", "rankings", "discover", "steer", "retrain-baseline",
                            "retrain-probe-filter-k1", "retrain-probe-switch-k1", "retrain-random-filter-k1",
                            "retrain-random-switch-k1"])
    assert _run(local_run) == []  # nothing changed: everything cached

    with local_run["pairs"].open("a", encoding="utf-8") as handle:  # same name, same folder, new content
        handle.write(json.dumps({"id": "p2", "prompt": "yo", "chosen": "c", "rejected": "d"}) + "\n")
    # the probing samples and triples come from the models and prompts only
    assert _run(local_run) == sorted(set(every) - {"probe_generations", "triples"})
    assert _run(local_run) == []


def test_editing_the_evaluation_prompts_reruns_only_the_retrains(local_run: dict[str, Any]) -> None:
    every = _run(local_run)
    local_run["eval"].write_text(json.dumps({"id": "e2", "prompt": "other"}) + "\n", encoding="utf-8")
    assert _run(local_run) == [name for name in every if name.startswith("retrain-")]


def test_new_weights_for_m1_rerun_everything_downstream_of_the_probing_samples(local_run: dict[str, Any]) -> None:
    every = _run(local_run)
    (local_run["m1"] / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}" + b"c" * 64)
    assert _run(local_run) == every


def test_stage_cache_reuses_only_matching_keys_with_outputs(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "stages")
    calls = []
    output = tmp_path / "out.txt"

    def work() -> dict[str, int]:
        calls.append(1)
        output.write_text("x")
        return {"n": len(calls)}

    assert cache.run("s", "k1", work, outputs=[output]) == {"n": 1}
    assert cache.run("s", "k1", work, outputs=[output]) == {"n": 1} and cache.reused == ["s"]
    assert cache.run("s", "k2", work, outputs=[output]) == {"n": 2}  # another key
    output.unlink()
    assert cache.run("s", "k2", work, outputs=[output]) == {"n": 3}  # its output is gone
    cache.stamp_path("s").write_text('{"key": "k2", "res')  # a stamp cut short is not a finished stage
    assert cache.run("s", "k2", work) == {"n": 4}


def test_chain_key_and_file_digest_follow_content_not_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("same")
    b.write_text("same")
    assert file_digest(a) == file_digest(b)
    b.write_text("other")
    assert file_digest(a) != file_digest(b)
    assert chain_key("x", {"k": 1}) == chain_key("x", {"k": 1}) != chain_key({"k": 1}, "x")
