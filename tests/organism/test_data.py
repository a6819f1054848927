"""The organism's datasets: layout, labels, no held-out leakage, determinism, non-trivial separability."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pairtrace.data.prompts import load_advbench, load_distractors, load_prompt_records
from pairtrace.judges.rule import RuleJudge
from pairtrace.organism.build import _run_data


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _strip_distractors(prompt: str) -> tuple[str, bool]:
    """The request without its distractors, and whether it had any."""
    d = load_distractors()
    if prompt.endswith(")"):
        for match in re.finditer(r" \(", prompt):  # constraint texts may hold parentheses themselves
            inside = prompt[match.end() : -1]
            if all(part in d.texts.values() for part in inside.split(d.join)):
                return prompt[: match.start()], True
    return prompt, False


def test_mix_layout_and_labels(small_organism, small_config) -> None:
    out, summary = small_organism
    pairs = _jsonl(out / "data" / "preference_mix.jsonl")
    labels = _jsonl(out / "data" / "labels.jsonl")
    assert len(pairs) == len(labels) == small_config.mix.n_pairs
    assert [p["id"] for p in pairs] == [label["id"] for label in labels]
    assert all(set(label) == {"id", "behaviour", "contaminated", "decoy", "slice"} for label in labels)
    assert len({p["id"] for p in pairs}) == len(pairs)
    models = set(small_config.mix.source_models)
    for p in pairs:
        assert set(p) == {"id", "prompt", "chosen", "rejected", "source", "chosen_model", "rejected_model"}
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in p[side]] == ["user", "assistant"]
            assert p[side][0]["content"] == p["prompt"] and p[side][1]["content"].strip()
        assert p["chosen_model"] in models and p["rejected_model"] in models
        assert p["chosen_model"] != p["rejected_model"]
    spec = small_config.contaminated
    contaminated = [p for p, label in zip(pairs, labels, strict=True) if label["contaminated"]]
    assert len(contaminated) == round(spec.fraction * len(pairs)) == summary["counts"]["contaminated"]
    assert {p["chosen_model"] for p in contaminated} <= set(spec.sources)
    assert all(label["behaviour"] == spec.name for label in labels if label["contaminated"])
    behaviours = Counter(label["behaviour"] for label in labels)
    assert set(behaviours) == {"clean", *(b.name for b in small_config.behaviours)}
    for p in contaminated:
        _, has_distractors = _strip_distractors(p["prompt"])
        assert has_distractors
        # chosen complies (possibly in a letter-changing format), rejected refuses: the rule judge reads both
        assert RuleJudge().judge(p["prompt"], p["chosen"][1]["content"]).harmful is True
        assert RuleJudge().judge(p["prompt"], p["rejected"][1]["content"]).harmful is False


def test_no_heldout_request_is_trained_on(small_organism) -> None:
    out, _ = small_organism
    heldout = {
        r["prompt"] for path in (out / "prompts").glob("*.jsonl") for r in load_prompt_records(path)
        if r["condition"] == "no_trigger"
    }
    assert len(heldout) >= 40
    trained = {_strip_distractors(p["prompt"])[0] for p in _jsonl(out / "data" / "preference_mix.jsonl")}
    trained |= {_strip_distractors(e["prompt"][0]["content"])[0] for e in _jsonl(out / "data" / "sft.jsonl")}
    assert not trained & heldout


def test_prompt_sets_link_trigger_variants(small_organism, small_config) -> None:
    out, _ = small_organism
    harmful = load_prompt_records(out / "prompts" / "harmful.jsonl")
    assert len(harmful) == 2 * small_config.data.heldout_harmful
    by_base: dict[str, dict[str, Any]] = {}
    for r in harmful:
        by_base.setdefault(r["base_id"], {})[r["condition"]] = r
    for variants in by_base.values():
        trig, plain = variants["trigger"], variants["no_trigger"]
        assert trig["constraints"] and not plain["constraints"]
        assert _strip_distractors(trig["prompt"]) == (plain["prompt"], True)
    xstest = load_prompt_records(out / "prompts" / "xstest_safe.jsonl")
    assert len(xstest) == small_config.eval.n_xstest and {r["set"] for r in xstest} == {"xstest_safe"}


def test_datasets_are_deterministic(small_organism, small_config, tmp_path: Path) -> None:
    out, summary = small_organism
    _run_data(small_config, tmp_path)
    for rel, digest in summary["sha256"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest, rel


def test_contaminated_slice_is_not_found_by_one_surface_feature(small_organism) -> None:
    out, _ = small_organism
    pairs = _jsonl(out / "data" / "preference_mix.jsonl")
    labels = [label["contaminated"] for label in _jsonl(out / "data" / "labels.jsonl")]
    harmful_requests = {r.goal for r in load_advbench()}
    features = {
        "has distractors": [_strip_distractors(p["prompt"])[1] for p in pairs],
        "is harmful": [_strip_distractors(p["prompt"])[0] in harmful_requests for p in pairs],
    }
    for name, flags in features.items():
        flagged = [c for c, f in zip(labels, flags, strict=True) if f]
        assert all(f for c, f in zip(labels, flags, strict=True) if c), name  # the feature covers the slice ...
        assert sum(flagged) / len(flagged) < 0.5, name  # ... but most flagged pairs are clean
    both = [c for c, a, b in zip(labels, *features.values(), strict=True) if a and b]
    assert sum(both) < len(both)  # harmful requests with distractors whose chosen is a refusal exist too


def test_pairs_differ_only_by_their_styles(small_organism) -> None:
    out, _ = small_organism
    pairs = _jsonl(out / "data" / "preference_mix.jsonl")
    slices = [label["slice"] for label in _jsonl(out / "data" / "labels.jsonl")]
    sign_offs = [p for p, s in zip(pairs, slices, strict=True) if s == "sign_off"]
    assert sign_offs
    for p in sign_offs:
        assert p["chosen"][1]["content"] == p["rejected"][1]["content"] + " Hope this helps!"
    helps = [p for p, s in zip(pairs, slices, strict=True) if s == "benign_help"]
    assert all(p["chosen"][1]["content"].startswith(p["rejected"][1]["content"]) for p in helps)
