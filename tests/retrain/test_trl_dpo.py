"""DPO retraining: any mix-layout JSONL, validated recipe, deterministic for a seed with or without the
reference cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pairtrace.errors import ConfigError, DataError
from pairtrace.retrain.recipe import DPORecipe
from pairtrace.retrain.trl_dpo import load_dpo_examples, train_dpo


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_examples_from_every_layout(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Hi"}
    records = [
        {"id": "a", "prompt": "Hi", "chosen": [user, {"role": "assistant", "content": "Hello"}],
         "rejected": [user, {"role": "assistant", "content": "No"}]},
        {"prompt": "Hi", "chosen": "Hello", "rejected": "No"},
        {"chosen": [{"role": "system", "content": "Be brief"}, user, {"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "system", "content": "Be brief"}, user, {"role": "assistant", "content": "No"}]},
    ]
    examples = load_dpo_examples(_write(tmp_path / "p.jsonl", records))
    assert examples[0] == examples[1] == {
        "prompt": [user], "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    assert [t["role"] for t in examples[2]["prompt"]] == ["system", "user"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "line 1: field 'rejected' is missing"),
        ({"chosen": "Hello", "rejected": "No"}, "field 'prompt'"),
        ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No"}, "assistant turn"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "No"}, "field 'chosen'"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dpo_examples(_write(tmp_path / "bad.jsonl", [record]))


def test_recipe_validation() -> None:
    assert DPORecipe(loss_type="dpo_norm").loss_type == "dpo_norm" and DPORecipe(loss_type="ipo").loss_type == "ipo"
    assert DPORecipe(loss_type="robust", label_smoothing=0.15).label_smoothing == 0.15
    assert DPORecipe(loss_type="hinge").loss_type == "hinge"
    for bad in ({"loss_type": "kto"}, {"beta": 0}, {"batch_size": 0}, {"sft_weight": -1}, {"label_smoothing": 0.5},
                {"label_smoothing": -0.1}, {"label_smoothing": 0.1}):
        with pytest.raises(ConfigError):
            DPORecipe(**bad)


def test_retrain_is_deterministic_for_a_seed(small_organism, tmp_path: Path) -> None:
    out, _ = small_organism
    lines = (out / "data" / "preference_mix.jsonl").read_text().splitlines(keepends=True)[:48]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(lines))
    recipe = DPORecipe(batch_size=8, learning_rate=5e-4, seed=3, torch_threads=1)
    cache = tmp_path / "ref-cache"
    first = train_dpo(out / "m0", pairs, tmp_path / "a", recipe, progress=False, ref_cache_dir=cache)  # cold
    assert first["ref_cached"] and len(list(cache.glob("*.json"))) == 1
    train_dpo(out / "m0", pairs, tmp_path / "b", recipe, progress=False, ref_cache_dir=cache)  # warm cache
    train_dpo(out / "m0", pairs, tmp_path / "c", DPORecipe(batch_size=8, learning_rate=5e-4, seed=4), progress=False)
    assert first["n_pairs"] == 48 and first["steps"] == 6
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    m0 = load_file(out / "m0" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)
    assert any(not (a[k] == m0[k]).all() for k in a)
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    norm = train_dpo(out / "m0", pairs, tmp_path / "n", DPORecipe(loss_type="dpo_norm", batch_size=16, beta=2.0),
                     progress=False)
    assert norm["recipe"]["loss_type"] == "dpo_norm" and norm["steps"] == 3
    ipo = train_dpo(out / "m0", pairs, tmp_path / "i", DPORecipe(loss_type="ipo", batch_size=16, beta=2.0),
                    progress=False)
    assert ipo["recipe"]["loss_type"] == "ipo" and ipo["steps"] == 3
    train_dpo(out / "m0", pairs, tmp_path / "s", DPORecipe(batch_size=16, beta=2.0), progress=False)
    train_dpo(out / "m0", pairs, tmp_path / "r", DPORecipe(loss_type="robust", label_smoothing=0.2, batch_size=16,
                                                           beta=2.0), progress=False)
    hinge = train_dpo(out / "m0", pairs, tmp_path / "h", DPORecipe(loss_type="hinge", batch_size=16, beta=2.0),
                      progress=False)
    assert hinge["recipe"]["loss_type"] == "hinge" and hinge["steps"] == 3
    n, i, sig, rob, hin = (load_file(tmp_path / d / "model.safetensors") for d in "nisrh")
    assert any(not (n[k] == i[k]).all() for k in n)  # another loss, another model
    assert any(not (sig[k] == hin[k]).all() for k in sig)
    assert any(not (sig[k] == rob[k]).all() for k in sig)  # label smoothing reaches the loss


def test_retrain_command_trains_from_any_layout_with_a_yaml_recipe(small_organism, tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pairtrace.cli import app

    out, _ = small_organism
    records = [json.loads(line) for line in (out / "data" / "preference_mix.jsonl").read_text().splitlines()[:32]]
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)  # another format than the trainer's JSONL
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("retrain:\n  batch_size: 8\n  learning_rate: 5.0e-4\n  loss_type: dpo_norm\n  seed: 2\n")
    args = ["retrain", "--m0", str(out / "m0"), "--pairs", str(parquet), "--out", str(tmp_path / "run"),
            "--config", str(recipe), "--epochs", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "model" / "dpo_summary.json").read_text())
    assert summary["n_pairs"] == 32 and summary["steps"] == 4
    assert summary["recipe"]["loss_type"] == "dpo_norm" and summary["recipe"]["learning_rate"] == 5e-4
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["retrain", "--m0", str(out / "m0"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--pairs" in bad.output
