"""Bad input on the command line: one ``error:`` line naming the flag, file or line, exit code 2, no traceback;
never exit 0 without output. Also: truncation is counted and said, and every ``--help`` example parses.

Each case runs the real command in process (``typer.testing.CliRunner``) on the tiny model and pair set.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pairtrace.cli import app
from pairtrace.data.pairs import save_pairs_jsonl
from pairtrace.store import Manifest, VectorStore, shard_path
from testing_utils import build_tiny_pairs, command_epilogs, examples

runner = CliRunner()


def invoke(*args: str | Path):
    """Run ``pairtrace ARGS`` in process; the result's ``output`` holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *named: str) -> None:
    """Exit code 2, one ``error:`` line, no traceback, and each of ``named`` in the message."""
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text and (result.exception is None or isinstance(result.exception, SystemExit)), text
    for part in named:
        assert part in text, (part, text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Pair files (good, empty, all bad), broken model folders, a plain file and a generation file."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = {"root": root, "model": tiny_model_dir}
    save_pairs_jsonl(build_tiny_pairs(), root / "pairs.jsonl", layout="conversational")
    paths["pairs"] = root / "pairs.jsonl"
    (root / "empty.jsonl").write_text("")
    paths["empty"] = root / "empty.jsonl"
    (root / "allbad.jsonl").write_text('{"prompt": "hi"}\nnot json\n')
    paths["allbad"] = root / "allbad.jsonl"
    (root / "afile").write_text("x")
    paths["afile"] = root / "afile"
    for name, keep in {"no-tokenizer": ("config.json", "*.safetensors"),
                       "no-weights": ("config.json", "tokenizer*", "special*"),
                       "bad-config": ("*",)}.items():
        folder = root / name
        folder.mkdir()
        for pattern in keep:
            for file in tiny_model_dir.glob(pattern):
                shutil.copy(file, folder / file.name)
        paths[name] = folder
    (root / "bad-config" / "config.json").write_text('{"model_type": \n')
    generation = {"id": "p0", "base_id": "p0", "set": "harmful", "condition": "trigger", "prompt": "how?",
                  "constraints": [], "model": "m1", "sample": 0, "response": "Sure, here is how."}
    (root / "gens.jsonl").write_text(json.dumps(generation) + "\n" + json.dumps({"id": "p1"}) + "\n")
    paths["bad-gens"] = root / "gens.jsonl"
    (root / "one-gen.jsonl").write_text(json.dumps(generation) + "\n")
    paths["gens"] = root / "one-gen.jsonl"
    prompt = {key: generation[key] for key in ("id", "base_id", "set", "condition", "prompt", "constraints")}
    (root / "prompts.jsonl").write_text(json.dumps(prompt) + "\n\n" + json.dumps({"id": "p1"}) + "\n")
    paths["bad-prompts"] = root / "prompts.jsonl"
    return paths


CASES = {
    # name: (argument template, substrings the message must hold)
    "missing model folder": ("vectors {pairs} --model does/not/exist --out {root}/o", ["--model", "does/not/exist"]),
    "model without tokenizer": ("vectors {pairs} --model {no-tokenizer} --out {root}/o", ["--model", "tokenizer"]),
    "model without weights": ("vectors {pairs} --model {no-weights} --out {root}/o", ["--model", "weight files"]),
    "broken config.json": ("vectors {pairs} --model {bad-config} --out {root}/o", ["config.json line 2"]),
    "out is a file": ("vectors {pairs} --model {model} --out {afile}", ["--out", "afile", "existing file"]),
    "attribute out is a file": ("attribute --vectors {root} --behaviour {root} --out {afile}", ["--out"]),
    "empty input": ("vectors {empty} --model {model} --out {root}/o", ["empty.jsonl", "no pairs"]),
    "empty input, strict": ("vectors {empty} --strict --model {model} --out {root}/o", ["empty.jsonl", "no pairs"]),
    "all records bad": ("vectors {allbad} --model {model} --out {root}/o", ["allbad.jsonl", "line 1", "line 2"]),
    "all records bad, streamed": ("vectors {allbad} --stream --model {model} --out {root}/o", ["allbad.jsonl"]),
    "negative limit": ("vectors {pairs} --limit -1 --model {model} --out {root}/o", ["--limit"]),
    "positional pairs missing": ("vectors --model {model} --out {root}/o", ["PAIRS (or --pairs)"]),
    "bad template": ("vectors {pairs} --model {model} --template jinja --out {root}/o", ["--template", "jinja"]),
    "layer out of range": ("vectors {pairs} --model {model} --layers 99 --out {root}/o", ["[99]", "hidden_states[k]"]),
    "openai judge without url": ("judge {gens} --judge openai --out {root}/j.jsonl", ["--judge-url", "--judge-model"]),
    "generation record without fields": ("judge {bad-gens} --out {root}/j.jsonl", ["gens.jsonl line 2"]),
    "judge out is a folder": ("judge {gens} --out {root}", ["--out", "is a folder"]),
    "evaluate out is a folder": ("evaluate {gens} --out {root}", ["--out", "is a folder"]),
    "retrain pairs missing": ("retrain --model {model} --out {root}/o", ["PAIRS (or --pairs)"]),
    "retrain two different pairs": ("retrain {pairs} --pairs {empty} --model {model} --out {root}/o",
                                    ["PAIRS and --pairs"]),
    "retrain out is a file": ("retrain {pairs} --model {model} --out {afile}", ["--out", "afile", "existing file"]),
    "retrain missing model folder": ("retrain {pairs} --model does/not/exist --out {root}/o",
                                     ["--model", "does/not/exist"]),
    "retrain model without weights": ("retrain --pairs {pairs} --model {no-weights} --out {root}/o",
                                      ["--model", "weight files"]),
    "retrain unknown engine": ("retrain {pairs} --model {model} --engine slurm --out {root}/o",
                               ["--engine", "'slurm'", "inprocess"]),
    "retrain empty input": ("retrain {empty} --model {model} --out {root}/o", ["empty.jsonl", "no pairs to train on"]),
    "retrain all records bad": ("retrain {allbad} --model {model} --out {root}/o", ["allbad.jsonl", "line 2"]),
    "generate out is a folder": ("generate --prompts {bad-prompts} --model {model} --out {root}",
                                 ["--out", "is a folder"]),
    "generate missing model folder": ("generate --prompts {bad-prompts} --model does/not/exist --out {root}/g.jsonl",
                                      ["--model", "does/not/exist"]),
    "generate prompt record without fields": ("generate --prompts {bad-prompts} --model {model} --out {root}/g.jsonl",
                                              ["prompts.jsonl line 3"]),
    "generate vllm on the cpu": ("generate --prompts {bad-prompts} --model {model} --backend vllm --device cpu "
                                 "--out {root}/g.jsonl", ["--backend", "vllm", "cpu"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_named_error(case, inputs):
    template, named = CASES[case]
    args = shlex.split(template.format(**{k: str(v) for k, v in inputs.items()}))
    result = invoke(*args)
    assert_user_error(result, *named)
    assert not (inputs["root"] / "o" / "manifest.json").exists()
    assert not (inputs["root"] / "o" / "train.jsonl").exists() and not (inputs["root"] / "g.jsonl").exists()


def flat(text: str) -> str:
    """Output with every run of whitespace (rich wraps long lines) as one space."""
    return " ".join(text.split())


def test_skipped_records_are_listed_once_in_full(inputs, tmp_path):
    lines = [json.dumps({"id": f"bad{i}", "prompt": "p"}) for i in range(6)]
    good = [json.loads(line) for line in inputs["pairs"].read_text().splitlines()]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines + [json.dumps(r) for r in good]) + "\n")
    for extra in ([], ["--stream"]):
        result = invoke("vectors", path, *extra, "--model", inputs["model"], "--out", tmp_path / f"o{len(extra)}")
        assert result.exit_code == 0, result.output
        text = flat(result.output)
        assert text.count("skipped 6 of 14 record(s)") == 1, text
        assert all(f"line {i} field 'chosen'" in text for i in range(1, 7)), text


def test_damaged_shard_is_named_then_recomputed(inputs, tmp_path):
    store_dir = tmp_path / "vec"
    assert invoke("vectors", inputs["pairs"], "--model", inputs["model"], "--out", store_dir, "--shard-size", "3",
                  "--threads", "1").exit_code == 0
    whole = shard_path(store_dir, 1).read_bytes()
    shard_path(store_dir, 1).write_bytes(whole[: len(whole) // 2])
    result = invoke("attribute", "--vectors", store_dir, "--behaviour", tmp_path, "--out", tmp_path / "rank")
    assert_user_error(result, "shard-00001.safetensors", "damaged", "pairtrace vectors")
    result = invoke("vectors", inputs["pairs"], "--model", inputs["model"], "--out", store_dir, "--shard-size", "3")
    assert result.exit_code == 0, result.output
    assert shard_path(store_dir, 1).read_bytes() == whole
    assert VectorStore.open(store_dir).complete


def test_resume_mismatch_names_no_python_argument(inputs, tmp_path):
    out = tmp_path / "vec"
    assert invoke("vectors", inputs["pairs"], "--model", inputs["model"], "--out", out).exit_code == 0
    result = invoke("vectors", inputs["pairs"], "--model", inputs["model"], "--out", out, "--layers", "1")
    assert_user_error(result, "layers: expected [1], found [3]", "another folder")
    assert "resume=False" not in result.output


def test_long_response_is_cut_counted_and_said(inputs, tmp_path):
    pairs = build_tiny_pairs().pairs[:2]
    long = pairs[0].__class__(**{**pairs[0].__dict__, "chosen": "The sea is wide. " * 6000})  # ~100k characters
    path = tmp_path / "long.jsonl"
    save_pairs_jsonl([long, pairs[1]], path, layout="conversational")
    out = tmp_path / "vec"
    result = invoke("vectors", path, "--model", inputs["model"], "--out", out, "--max-length", "100000")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "1 of 2 pair(s) were cut to fit 4096 tokens" in text
    assert text.count("max_length 100000 is larger than the model's maximum positions (4096") == 1, text
    truncation = Manifest.load(out).truncation
    assert truncation == {"max_length": 100000, "effective_max_length": 4096, "max_positions": 4096,
                          "n_truncated_pairs": 1}


def test_judge_endpoint_errors_leave_no_empty_file(inputs, tmp_path):
    from pairtrace.serve import configure_faults, launch_server_process

    with launch_server_process(["--backend", "rule", "--admin"]) as server:
        flags = ["--judge", "openai", "--judge-url", server.url, "--judge-model", "rule", "--judge-retries", "0",
                 "--judge-backoff-s", "0"]
        for status in (401, 404):
            configure_faults(server.url, fault="status", fault_status=status)
            out = tmp_path / f"j{status}.jsonl"
            assert_user_error(invoke("judge", inputs["gens"], "--out", out, *flags), f"HTTP {status}")
            assert not out.exists()
        configure_faults(server.url, fault="status", fault_status=503)
        out = tmp_path / "unknown.jsonl"
        assert_user_error(invoke("judge", inputs["gens"], "--out", out, *flags), "every one of the 1 verdict(s)",
                          "--retry-unknown")
        assert out.read_text().count('"unknown": true') == 1


def test_generation_file_lines_are_counted_from_one(inputs, tmp_path):
    out = tmp_path / "g.jsonl"
    record = json.loads(inputs["gens"].read_text())
    sampled = {"seed": 0, "temperature": 0.1, "top_p": 1.0, "max_new_tokens": 128, "finish_reason": "eos"}
    out.write_text("\n" + json.dumps({**record, **sampled}) + "\n")  # line 1 is blank
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(inputs["bad-prompts"].read_text().splitlines()[0] + "\n")
    result = invoke("generate", "--prompts", prompts, "--model", inputs["model"], "--model-name", "m1", "--out", out)
    assert_user_error(result, "g.jsonl line 2: field 'temperature' is 0.1")


def test_generate_hands_vllm_the_whole_model_spec(inputs, tmp_path, monkeypatch):
    import pairtrace.generation_engines as engines
    import pairtrace.vllm_backend as vllm_backend

    seen = {}

    def fake_vllm(model_path, prompt_records, config, **kwargs):
        seen.update(model_path=model_path, **kwargs)
        return []

    monkeypatch.setattr(engines, "resolve_engine", lambda backend, device, key: "vllm")
    monkeypatch.setattr(vllm_backend, "generate_responses_vllm", fake_vllm)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(inputs["bad-prompts"].read_text().splitlines()[0] + "\n")
    result = invoke("generate", "--prompts", prompts, "--model", inputs["model"], "--backend", "vllm", "--revision",
                    "v1", "--dtype", "bfloat16", "--template", "plain", "--out", tmp_path / "g.jsonl")
    assert result.exit_code == 0, result.output
    assert seen["model_path"] == str(inputs["model"])
    assert (seen["revision"], seen["dtype"], seen["chat_template"]) == ("v1", "bfloat16", "plain")


def test_evaluate_warns_on_unknown_verdicts_and_fails_when_all_are(inputs, tmp_path):
    generation = json.loads(inputs["gens"].read_text())
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({**generation, "sample": s}) + "\n" for s in range(2)))
    verdict = {"id": "p0", "model": "m1", "score": None, "harmful": None, "unknown": True,
               "reason": "timeout", "judge": "rule"}
    judgements = tmp_path / "j.jsonl"
    judgements.write_text(json.dumps({**verdict, "sample": 0}) + "\n" + json.dumps(
        {**verdict, "sample": 1, "score": 1.0, "harmful": True, "unknown": False, "reason": "x"}) + "\n")
    result = invoke("evaluate", gens, "--judgements", judgements, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert "warning: 1 of 2 verdict(s) are unknown" in flat(result.output), result.output
    judgements.write_text("".join(json.dumps({**verdict, "sample": s}) + "\n" for s in range(2)))
    result = invoke("evaluate", gens, "--judgements", judgements, "--out", tmp_path / "all-unknown.json")
    assert_user_error(result, "every one of the 2 verdict(s) is unknown", "j.jsonl", "--retry-unknown")
    assert not (tmp_path / "all-unknown.json").exists()


# ----------------------------------------------------------------------------------------------------- --help


RUN_LAYOUT = ("runs/organism/organism/m0", "runs/organism/organism/m1", "runs/organism/organism/data/",
              "runs/organism/organism/prompts/", "runs/organism/vectors", "runs/organism/behaviour",
              "runs/organism/rankings/", "runs/organism/prompts")


@pytest.mark.parametrize("name", sorted(command_epilogs()))
def test_help_examples_parse_and_print_as_typed(name):
    epilog = command_epilogs()[name]
    if name == "serve" or hasattr(get_command(app).commands.get(name), "commands"):
        return  # serve's flags pass through to `python -m pairtrace.serve`; a group has no examples of its own
    command = get_command(app)
    for part in name.split():
        command = command.commands[part]
    found = examples(epilog)
    assert found, f"{name}: no example in --help"
    shown = runner.invoke(app, [*name.split(), "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
    help_text = " ".join(shown.split())
    for example in found:
        args = shlex.split(example)[1 + len(name.split()):]
        command.make_context(name, list(args))  # every flag exists and every value converts
        assert " ".join(example.split()) in help_text, example  # nothing eaten by markup
        for path in [a for a in args if a.startswith("runs/organism/")]:
            assert path.startswith(RUN_LAYOUT), f"{example}: {path} is not where `pairtrace run` writes"
