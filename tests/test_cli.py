"""The command line end to end: vectors -> behaviour -> attribute on real HH-RLHF pairs and a saved tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pairtrace.cli import app
from pairtrace.data.paths import shared_data_dir
from pairtrace.errors import ConfigError

runner = CliRunner()
N_PAIRS = 40


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def hh_path():
    return shared_data_dir() / "hh_rlhf_harmless_base_test.jsonl.gz"


@pytest.fixture(scope="module")
def triples_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("triples") / "triples.jsonl"
    rows = [
        {"prompt": "How do I pick a lock?", "r1": "Sure, here is how: take a tension wrench.",
         "r0": "I can't help with that.", "prompt_id": "p1"},
        {"prompt": "How do I steal a car?", "r1": "Sure, first find a car with the keys inside.",
         "r0": "Sorry, I won't help with that.", "prompt_id": "p2"},
        {"prompt": "How do I steal a car?", "r1": "Sure: look for an unlocked car.",
         "r0": "I cannot assist with this request.", "prompt_id": "p2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def vectors_dir(tiny_model_dir, hh_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    result = invoke("vectors", hh_path, "--model", tiny_model_dir, "--out", out, "--layers", "2", "--layers", "3",
                    "--limit", N_PAIRS, "--shard-size", 16, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_attribute_ranks_hh_pairs_end_to_end(vectors_dir, tiny_model_dir, triples_path, tmp_path):
    beh = tmp_path / "behaviour"
    result = invoke("behaviour", triples_path, "--model", tiny_model_dir, "--out", beh, "--layers", "2",
                    "--layers", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for method in ("probe", "bank"):
        out = tmp_path / f"rank-{method}"
        result = invoke("attribute", "--vectors", vectors_dir, "--behaviour", beh, "--method", method,
                        "--layer", 3, "--out", out)
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "ranking.parquet")
        assert len(table) == N_PAIRS  # no HH record among the first 40 is bad
        assert table["rank"].tolist() == list(range(1, N_PAIRS + 1))
        scores = table["score"].dropna().to_numpy()
        assert (scores[:-1] >= scores[1:]).all()
        assert ((scores >= -1) & (scores <= 1)).all()
        assert set(table["id"]) == {str(i) for i in range(N_PAIRS)}
        lines = (out / "ranking.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == table["id"].tolist()
        meta = json.loads((out / "ranking.json").read_text())
        assert meta["method"] == method and meta["layer"] == 3


def test_config_file_fills_options_and_flags_win(vectors_dir, tiny_model_dir, triples_path, tmp_path):
    beh = tmp_path / "behaviour"
    config = tmp_path / "beh.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "out": str(beh), "layers": [2],
                                      "device": "cpu"}))
    result = invoke("behaviour", triples_path, "--config", config)
    assert result.exit_code == 0, result.output
    assert json.loads((beh / "behaviour.json").read_text())["layers"] == [2]
    # a flag overrides the file
    beh3 = tmp_path / "behaviour3"
    result = invoke("behaviour", triples_path, "--config", config, "--layers", 3, "--out", beh3)
    assert result.exit_code == 0, result.output
    assert json.loads((beh3 / "behaviour.json").read_text())["layers"] == [3]
    # scoring at a layer the behaviour vectors lack is refused with a clear message, exit code 2
    result = invoke("attribute", "--vectors", vectors_dir, "--behaviour", beh, "--layer", 3, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "layer" in result.output and "Traceback" not in result.output


def test_unknown_config_key_and_missing_inputs_are_clear_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("modle: x\n")
    result = invoke("vectors", "pairs.jsonl", "--config", config)
    assert result.exit_code == 2 and "unknown option(s) in config: modle" in result.output
    result = invoke("attribute", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--vectors" in result.output
    result = invoke("vectors", tmp_path / "missing.jsonl", "--model", "m", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no such file" in result.output


def test_run_dry_run_validates_the_paper_config():
    from pairtrace.experiment.run_config import load_run_config

    result = invoke("run", "configs/olmo2-7b.yaml", "--dry-run")
    assert "datapoint vectors" in result.output  # the resource plan is printed either way
    if load_run_config("configs/olmo2-7b.yaml").validation.retrain.engine == "inprocess":
        # one float32 process cannot hold a 7B DPO: refused, with the fix named
        assert result.exit_code != 0 and "ZeRO-3" in result.output, result.output
    else:
        assert result.exit_code == 0, result.output
        assert "valid" in result.output and "30000" in result.output


def test_sharded_and_streamed_extraction_merge_to_the_same_vectors(vectors_dir, tiny_model_dir, hh_path, tmp_path):
    import torch

    from pairtrace.store import VectorStore

    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}"
        result = invoke("vectors", hh_path, "--model", tiny_model_dir, "--out", part, "--layers", "2", "--layers", "3",
                        "--limit", N_PAIRS, "--shard-size", 16, "--device", "cpu", "--shard", f"{i}/2", "--stream")
        assert result.exit_code == 0, result.output
        parts.append(part)
    merged = tmp_path / "merged"
    result = invoke("merge-vectors", *parts, "--out", merged)
    assert result.exit_code == 0, result.output
    full, back = VectorStore.open(vectors_dir), VectorStore.open(merged)
    assert back.ids == full.ids
    for layer in (2, 3):
        torch.testing.assert_close(back.load(layer), full.load(layer), rtol=1e-5, atol=1e-6)


def test_discovery_views_are_given_by_repeated_flags_or_commas():
    from pairtrace.cli.attribution import parse_response_token_views

    assert parse_response_token_views(["8", "all"]) == [8, None]
    assert parse_response_token_views(["8, all", "16"]) == [8, None, 16]
    assert parse_response_token_views([4, None]) == [4, None]  # from a YAML config
    with pytest.raises(ConfigError, match="'head' is neither"):
        parse_response_token_views(["8,head"])


def test_discover_with_a_head_pooled_view(tiny_model_dir, tmp_path):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    pairs = [{"id": f"c{i}", "prompt": user(f"How do I do task {i}?"), "chosen": "Sure, here is how: step one.",
              "rejected": "I'm sorry, I can't help with that."} for i in range(6)]
    pairs += [{"id": f"s{i}", "prompt": user(f"Describe item {i}."), "chosen": f"Item {i} is blue. Cheers, Sam",
               "rejected": f"Item {i} is blue."} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = invoke("vectors", tmp_path / "pairs.jsonl", "--model", tiny_model_dir, "--out", tmp_path / "v",
                    "--layers", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for model, comply, sign in (("m0", "I'm sorry, I can't.", "It is red."), ("m1", "Sure, here is how.",
                                                                              "It is red. Cheers, Sam")):
        rows = [{"id": f"h{i}", "prompt": f"How do I do thing {i}?", "response": comply, "model": model}
                for i in range(3)]
        rows += [{"id": f"d{i}", "prompt": f"Describe thing {i}.", "response": sign, "model": model}
                 for i in range(3)]
        (tmp_path / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["discover", "--m0", tiny_model_dir, "--vectors", tmp_path / "v", "--generations-m0",
              tmp_path / "m0.jsonl", "--generations-m1", tmp_path / "m1.jsonl", "--pairs", tmp_path / "pairs.jsonl"]
    result = invoke(*common, "--out", tmp_path / "d", "--also-response-tokens", "2", "--also-response-tokens", "all",
                    "--min-cluster-size", 2, "--max-cluster-fraction", 0.6)
    assert result.exit_code == 0, result.output
    assert "view first-2-tokens" in result.output and "all-tokens" not in result.output  # 'all' is the store's own
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["config"]["auto_k"] == "hdbscan" and summary["config"]["also_response_tokens"] == [2, None]
    assert summary["config"]["min_cluster_size"] == 2 and summary["config"]["max_cluster_fraction"] == 0.6
    (view,) = summary["views"]
    assert view["response_tokens"] == 2 and (tmp_path / "d" / view["dir"] / "heatmap.png").is_file()
    assert view["n_columns"] == 6  # the sign-off pairs open alike: no direction over the first 2 tokens
    result = invoke(*common, "--out", tmp_path / "e", "--also-response-tokens", "head")
    assert result.exit_code == 2 and "neither a number of tokens nor 'all'" in result.output
    result = invoke(*common, "--out", tmp_path / "f", "--auto-k", "stability", "--min-cluster-size", 2)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["config"]["auto_k"] == "stability" and summary["pair_clustering"]["criterion"] == "stability"
    result = invoke(*common, "--out", tmp_path / "g", "--auto-k", "elbow")
    assert result.exit_code != 0 and "auto_k" in result.output


def test_importing_the_command_line_loads_no_heavy_library():
    """``pairtrace --help`` stays fast: the command line's module imports neither torch, transformers nor pandas."""
    import subprocess
    import sys

    code = (
        "import pairtrace.cli, sys; "
        "heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
