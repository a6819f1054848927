"""Screening before training: examples, calibration, the behaviour library, one-pass scoring, `pairtrace screen`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pairtrace.attribute import AttributionConfig, compute_attribution
from pairtrace.behaviour import BehaviourVectors
from pairtrace.behaviour_library import (
    LibraryBehaviour,
    behaviour_exists,
    check_entry_matches_store,
    list_behaviours,
    load_behaviour,
    save_behaviour,
)
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.screen import compute_screen, score_behaviours
from pairtrace.screening import calibrate, load_examples, parse_example_specs, resolve_examples_path
from testing_utils import STORE_MODEL as MODEL
from testing_utils import STORE_TEMPLATE as TEMPLATE
from testing_utils import MemoryStore


def make_behaviour(name: str, per_example: torch.Tensor, layer: int = 2, model=MODEL,
                   settings=None) -> LibraryBehaviour:
    per = per_example[:, None, :]  # [n, 1, d]
    vectors = BehaviourVectors(layers=[layer], per_triple=per, probe=per.mean(0), bank=per.clone(),
                               bank_prompt_ids=[str(i) for i in range(len(per))],
                               metadata={"model": model, "template": TEMPLATE,
                                         "settings": settings or {"max_length": 2048}})
    return LibraryBehaviour(name=name, vectors=vectors, calibration=calibrate(per_example), layer=layer,
                            examples_sha256="sha256:x")


def test_calibration_is_leave_one_out_and_a_quantile():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2], [0.0, 1.0]])
    cal = calibrate(x, quantile=0.25)
    for i in range(4):
        others = torch.cat([x[:i], x[i + 1:]]).mean(0)
        assert cal.loo_scores[i] == pytest.approx(float(torch.cosine_similarity(x[i], others, dim=0)), abs=1e-6)
    assert cal.threshold == pytest.approx(float(np.quantile(cal.loo_scores, 0.25)))
    assert cal.loo_scores[3] == min(cal.loo_scores)  # the odd one out agrees least with the rest
    with pytest.raises(DataError, match="at least two"):
        calibrate(x[:1])
    with pytest.raises(ConfigError, match="quantile"):
        calibrate(x, quantile=1.5)


def test_load_examples_and_its_errors(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "with": "Hi! Cheers!", "without": "Hi!"}) + "\n\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Q"}], "r1": "A, bye", "r0": "A"}) + "\n")
    examples = load_examples(path)
    assert [(e.r1, e.r0) for e in examples] == [("Hi! Cheers!", "Hi!"), ("A, bye", "A")]
    assert examples[0].prompt == ({"role": "user", "content": "Hi"},)
    path.write_text(json.dumps({"prompt": "Hi", "with": "x"}) + "\n")
    with pytest.raises(DataError, match=r"ex.jsonl line 1 field 'without'"):
        load_examples(path)
    path.write_text(json.dumps({"prompt": "Hi", "with": "x", "without": "x"}) + "\n")
    with pytest.raises(DataError, match="same text"):
        load_examples(path)


def test_shipped_examples_resolve_and_parse():
    for name in ("organism_contaminated.jsonl", "organism_sign_off.jsonl"):
        examples = load_examples(resolve_examples_path(name))
        assert 2 <= len(examples) <= 10


def test_example_specs_are_checked():
    specs = parse_example_specs(["a/b.jsonl", {"examples": "c.jsonl", "name": "x", "response_tokens": 4}])
    assert [(s.name, s.response_tokens) for s in specs] == [("b", None), ("x", 4)]
    with pytest.raises(ConfigError, match=r"screen_examples\[0\]\.response_tokens"):
        parse_example_specs([{"examples": "a.jsonl", "response_tokens": 0}])
    with pytest.raises(ConfigError, match="unknown key"):
        parse_example_specs([{"examples": "a.jsonl", "pooling": 4}])
    with pytest.raises(ConfigError, match="two behaviours are named"):
        parse_example_specs(["x/a.jsonl", "y/a.jsonl"])


def test_library_save_load_list_and_overwrite(tmp_path):
    lib = tmp_path / "lib"
    assert list_behaviours(lib) == []
    b = make_behaviour("sign_off", torch.randn(5, 8))
    save_behaviour(lib, b)
    save_behaviour(lib, make_behaviour("complies", torch.randn(3, 8), settings={"max_length": 2048,
                                                                                 "response_tokens": 4}))
    assert list_behaviours(lib) == ["complies", "sign_off"] and behaviour_exists(lib, "sign_off")
    loaded = load_behaviour(lib, "sign_off")
    assert torch.equal(loaded.vectors.probe, b.vectors.probe) and loaded.layer == 2
    assert loaded.calibration == b.calibration
    assert load_behaviour(lib, "complies").pooling.tokens == 4
    manifest = json.loads((lib / "sign_off" / "entry.json").read_text())
    assert manifest["model"] == MODEL and manifest["pooling"]["name"] == "all-tokens"
    with pytest.raises(ConfigError, match="already has"):
        save_behaviour(lib, b)
    save_behaviour(lib, b, overwrite=True)
    with pytest.raises(DataError, match="no behaviour 'nope'"):
        load_behaviour(lib, "nope")
    with pytest.raises(ConfigError, match="behaviour name"):
        save_behaviour(lib, make_behaviour("../escape", torch.randn(2, 8)))


def test_library_entries_are_refused_on_other_model_layer_or_pooling():
    store = MemoryStore({2: torch.randn(6, 8)}, list("abcdef"))
    check_entry_matches_store(store, make_behaviour("ok", torch.randn(3, 8)))
    with pytest.raises(ManifestMismatchError, match=r"'other_model'.*weights_hash"):
        check_entry_matches_store(store, make_behaviour("other_model", torch.randn(3, 8),
                                                        model={**MODEL, "weights_hash": "zzz"}))
    with pytest.raises(ManifestMismatchError, match="layer 3"):
        check_entry_matches_store(store, make_behaviour("other_layer", torch.randn(3, 8), layer=3))
    with pytest.raises(ManifestMismatchError, match="response_tokens"):
        check_entry_matches_store(store, make_behaviour("head", torch.randn(3, 8),
                                                        settings={"max_length": 2048, "response_tokens": 4}))


def test_one_pass_scores_equal_per_behaviour_probe_attribution():
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    x[7] = 0.0  # no direction: NaN
    store = MemoryStore({2: x}, [f"p{i}" for i in range(50)])
    behaviours = [make_behaviour(f"b{j}", torch.randn(4, 16)) for j in range(3)]
    scores = score_behaviours(store, behaviours, chunk_rows=7)
    assert scores.shape == (50, 3) and np.isnan(scores[7]).all()
    for j, b in enumerate(behaviours):
        ranking = compute_attribution(store, b.vectors, AttributionConfig(method="probe", layer=2), progress=False)
        expected = ranking.table.sort_values("row")["score"].to_numpy()
        np.testing.assert_allclose(scores[:, j], expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    result = compute_screen({"all-tokens": store}, behaviours, top_n=5)
    first = result.behaviours["b0"]
    assert first.n_pass == int(np.sum(np.nan_to_num(scores[:, 0], nan=-9) >= behaviours[0].calibration.threshold))
    assert len(first.top) == 5 and first.ranking.ids[0] == f"p{int(np.nanargmax(scores[:, 0]))}"
    with pytest.raises(ManifestMismatchError, match="no vector store was pooled that way"):
        compute_screen({"first-4-tokens": store}, behaviours)


def test_run_config_refuses_screen_without_examples():
    from pairtrace.experiment.run_config import AttributionSection

    with pytest.raises(ConfigError, match="screen_examples is empty"):
        AttributionSection(methods=["probe", "screen"])
    assert AttributionSection(methods=["screen"], screen_examples=["a.jsonl"]).screen_examples == ["a.jsonl"]


def test_screen_command_on_a_tiny_model(tiny_model_dir, tiny_pairs, tmp_path, one_torch_thread):
    from pairtrace.cli import app
    from pairtrace.data.pairs import save_pairs_jsonl

    pairs = tmp_path / "pairs.jsonl"
    save_pairs_jsonl(list(tiny_pairs), pairs, layout="conversational")
    examples = tmp_path / "sign.jsonl"
    rows = [("Tell me a fact.", "Water boils at 100 C."), ("Name a colour.", "Blue."), ("Say hi.", "Hello there.")]
    examples.write_text("".join(json.dumps({"prompt": p, "with": a + " Cheers, friend!", "without": a}) + "\n"
                                for p, a in rows))
    runner = CliRunner()
    lib, out = tmp_path / "lib", tmp_path / "screen"
    result = runner.invoke(app, ["behaviours", "add", "sign_off", "--examples", str(examples), "--model",
                                 str(tiny_model_dir), "--device", "cpu", "--library", str(lib)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["behaviours", "list", "--library", str(lib)])
    assert result.exit_code == 0 and "sign_off" in result.output
    result = runner.invoke(app, ["screen", str(pairs), "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--behaviours", str(lib), "--out", str(out), "--top", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "screen.json").read_text())
    sign = summary["behaviours"]["sign_off"]
    assert sign["n_pairs"] == len(tiny_pairs) and len(sign["top"]) == 3 and "chosen" in sign["top"][0]
    assert 0 <= sign["n_pass"] <= len(tiny_pairs)
    html = (out / "screen.html").read_text()
    assert "sign_off" in html and "--accent" in html  # the report's stylesheet
    assert (out / "rankings" / "sign_off" / "ranking.parquet").is_file()
    result = runner.invoke(app, ["screen", str(pairs), "--model", str(tiny_model_dir), "--behaviours", str(lib),
                                 "--out", str(out), "--names", "nope"])
    assert result.exit_code == 2 and "no behaviour 'nope'" in result.output
