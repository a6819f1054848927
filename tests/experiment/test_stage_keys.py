"""The run's stage cache: chained keys with content digests, so an edited local input file reruns exactly the
stages that read it. The stages themselves are replaced by recorders here; the real ones run in test_run.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pairtrace.experiment import run as run_module
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.run_config import load_run_config
from pairtrace.stage_cache import StageCache, chain_key, file_digest


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


def test_new_weights_for_m1_rerun_what_reads_them_but_not_the_retrains_no_ranking_selects(
        local_run: dict[str, Any]) -> None:
    every = _run(local_run)
    (local_run["m1"] / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}" + b"c" * 64)
    unranked = {"retrain-baseline", "retrain-random-filter-k1", "retrain-random-switch-k1"}  # retrained from M0
    assert _run(local_run) == sorted(set(every) - unranked)


def test_new_weights_for_m0_rerun_everything(local_run: dict[str, Any]) -> None:
    every = _run(local_run)
    (local_run["m0"] / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}" + b"c" * 64)
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
