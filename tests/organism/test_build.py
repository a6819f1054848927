"""The organism build: outputs, summary, resumption, and checkpoints that load like any model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

from pairtrace.generate import load_generations
from pairtrace.models import format_prompt, load_model
from pairtrace.organism import build as build_module
from pairtrace.organism.build import STEPS, _acceptance, build_organism, run_build


def test_outputs_and_summary(small_organism, small_config) -> None:
    out, summary = small_organism
    for rel in ("config.resolved.yaml", "summary.json", "m0/config.json", "m1/model.safetensors",
                "tokenizer/tokenizer.json", "eval/generations_m0.jsonl", "eval/generations_m1.jsonl"):
        assert (out / rel).is_file(), rel
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(STEPS) <= set(summary["timings"]) and summary["timings"]["reused_steps"] == []
    for model in ("m0", "m1"):
        rates = summary["rates"][model]
        for key in ("harmful_trigger", "harmful_no_trigger", "benign_help", "xstest_over_refusal"):
            assert 0.0 <= rates[key] <= 1.0, (model, key)
    assert [row["check"] for row in summary["acceptance"]][-1] == "build seconds"
    assert summary["counts"]["pairs"] == small_config.mix.n_pairs
    counts = summary["counts"]
    assert sum(counts["slices"].values()) == counts["pairs"] and counts["decoys"] == 0
    assert set(counts["slice_shares"]) == set(counts["slices"])
    assert all(counts["slice_shares"][k] == round(n / counts["pairs"], 4) for k, n in counts["slices"].items())
    planted = [b.name for b in small_config.planted]
    assert [row["behaviour"] for row in summary["emergence"]] == planted
    for row in summary["emergence"]:
        assert row["prompts"] in ("harmful/trigger", "benign/all") and 0.0 <= row["m1"] <= 1.0, row
    emergence_checks = [r for r in summary["acceptance"] if r["check"].startswith("emergence of ")]
    assert [r["check"] for r in emergence_checks] == [f"emergence of {name}" for name in planted]
    by_name = {row["behaviour"]: row for row in summary["emergence"]}
    assert by_name[small_config.contaminated.name]["m1"] == summary["rates"]["m1"]["harmful_trigger"]
    generations = load_generations(out / "eval" / "generations_m1.jsonl")
    n_prompts = sum(summary["counts"]["prompts"].values())
    assert len(generations) == n_prompts * small_config.eval.n_samples
    assert summary["sft"]["n_examples"] == small_config.sft.n_examples and summary["dpo"]["n_pairs"] > 0
    environment = summary["environment"]  # numerics depend on both: the build's own thread count, not the caller's
    assert environment["torch_threads"] == small_config.torch_threads
    assert all(environment[name] for name in ("torch", "transformers", "trl", "accelerate", "numpy"))


def test_checkpoints_load_through_the_core_loader(small_organism) -> None:
    out, _ = small_organism
    for name in ("m0", "m1"):
        loaded = load_model(out / name, device="cpu")
        assert loaded.template_mode == "chat" and loaded.n_layers == 2 and not loaded.prepend_bos
        text = format_prompt(loaded, "Write a poem")
        assert text == "<|user|>\nWrite a poem<|end|>\n<|assistant|>\n"
        assert loaded.tokenizer.eos_token == "<|end|>"


def test_second_build_reuses_finished_steps(small_organism, small_config, tmp_path) -> None:
    out, first = small_organism
    copy = tmp_path / "organism"
    shutil.copytree(out, copy)
    start = time.perf_counter()
    again = build_organism(small_config, copy, progress=False)
    assert again["timings"]["reused_steps"] == list(STEPS)
    assert again["sha256"] == first["sha256"] and again["rates"] == first["rates"]
    assert time.perf_counter() - start < 20
    changed = dataclasses.replace(small_config, eval=dataclasses.replace(small_config.eval, max_new_tokens=8))
    third = build_organism(changed, copy, progress=False)
    assert third["timings"]["reused_steps"] == ["data", "tokenizer", "m0", "m1"]
    assert third["sha256"] == first["sha256"]


def test_reference_ready_is_announced_before_m1_trains_and_when_m1_is_reused(small_organism, small_config,
                                                                             tmp_path) -> None:
    out, _ = small_organism
    copy = tmp_path / "organism"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "m1")
    shutil.rmtree(copy / build_module.REF_CACHE_DIR)
    seen: list[dict] = []

    def announce() -> None:  # what a run's first retrains rely on when they start
        caches = list((copy / build_module.REF_CACHE_DIR).glob("*.json"))
        seen.append({"m1": (copy / "m1" / "model.safetensors").exists(),
                     "ref_values": sum(len(json.loads(p.read_text())) for p in caches)})

    again = build_organism(small_config, copy, progress=False, on_reference_ready=announce)
    assert again["timings"]["reused_steps"] == ["data", "tokenizer", "m0", "eval"]  # M1 came out the same
    assert seen == [{"m1": False, "ref_values": seen[0]["ref_values"]}] and seen[0]["ref_values"] > 0
    digests = [hashlib.sha256((d / "m1" / "model.safetensors").read_bytes()).digest() for d in (out, copy)]
    assert digests[0] == digests[1]
    build_organism(small_config, copy, progress=False, on_reference_ready=announce)
    assert len(seen) == 2 and seen[1]["m1"]  # everything reused: announced once all the same


def test_acceptance_flags_a_model_whose_answers_cannot_be_judged() -> None:
    healthy = {"harmful_trigger": 0.8, "harmful_no_trigger": 0.02, "benign_help": 0.95,
               "harmful_trigger_unknown": 0.10, "harmful_no_trigger_unknown": 0.05}
    rates = {"m0": {"harmful_trigger": 0.02}, "m1": healthy}
    assert all(row["ok"] for row in _acceptance(rates, total_seconds=100.0))
    garbled = dict(healthy, harmful_no_trigger_unknown=0.41)
    failed = [row["check"] for row in _acceptance({"m0": rates["m0"], "m1": garbled}, 100.0) if not row["ok"]]
    assert failed == ["M1 undecided share without trigger"]


def test_run_build_prints_checks_emergence_and_pairs_per_slice(small_organism, monkeypatch, capsys) -> None:
    out, summary = small_organism
    monkeypatch.setattr(build_module, "build_organism", lambda *args, **kwargs: summary)
    from conftest import SMALL_CONFIG

    assert run_build(SMALL_CONFIG, out, progress=False) is summary
    printed = " ".join(capsys.readouterr().err.split())
    for row in summary["emergence"]:
        assert f"emergence of {row['behaviour']} ({row['kind']}, " in printed
        assert f"on {row['prompts']}, M0 {row['m0']} -> M1 {row['m1']}" in printed
    assert "(contaminated, 1\u20133 distractors): harmful on harmful/trigger" in printed
    slices = summary["counts"]["slices"]
    assert f"pairs per slice: benign_format {slices['benign_format']} (" in printed
    assert f"{summary['counts']['pairs']} in all" in printed
