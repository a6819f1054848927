"""Every example of every ``--help`` runs, against the reduced organism and small artefacts built from it.

The examples are read from the typer app (:func:`command_epilogs`), so a new example is run as soon as it is
written. Each runs as typed in a fresh folder, with its input paths rewritten to fixtures (:data:`INPUTS`) and
nothing else changed, except where :data:`ADJUSTED` says how and why. An example that cannot run offline on a
CPU is in :data:`SKIPPED` with its reason; ``test_every_example_runs_or_is_skipped_for_a_reason`` prints that
list and fails on an example that is neither run nor listed, or a listed one that no longer exists.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pairtrace.cli import app
from testing_utils import command_epilogs, examples

REPO = Path(__file__).resolve().parents[2]
SCREENING_FILES = REPO / "src" / "pairtrace" / "data" / "screening"
runner = CliRunner()


ALL_EXAMPLES = {example: name for name, epilog in sorted(command_epilogs().items()) for example in examples(epilog)}
"""Every example of every ``--help`` -> its command's name."""

SKIPPED = {
    "pairtrace vectors allenai/olmo-2-1124-7b-preference-mix --data-revision SHA --split train --model "
    "allenai/OLMo-2-1124-7B-SFT --layers 20 --dtype bfloat16 --stream --out vec/":
        "a hub dataset and a 7B hub model: needs the network (the local-file path runs in the first example)",
    "pairtrace vectors mix.parquet --model m0/ --backend ray --ray-workers 8 --ray-gpus-per-worker 1 --out vec/":
        "Ray with 8 one-GPU workers: needs GPUs (tests/test_ray_backend.py runs Ray on the CPU)",
    "pairtrace retrain --model m0/ --pairs mix.jsonl --engine accelerate --num-processes 8 --accelerate-config "
    "zero3.yaml --gradient-checkpointing --out runs/retrain":
        "8 processes under DeepSpeed ZeRO-3: needs GPUs (benchmarks/rehearsal.py runs 2 CPU processes)",
    "pairtrace screen allenai/olmo-2-1124-7b-preference-mix --data-revision <sha> --split train --model "
    "allenai/OLMo-2-1124-7B-SFT --dtype bfloat16 --behaviours lib/ --names sign_off --out screen/":
        "a hub dataset and a 7B hub model: needs the network (the local-file screen runs)",
    "pairtrace organism build --out runs/org":
        "the full organism build (configs/organism.yaml) takes tens of minutes on a CPU; the reduced build "
        "(configs/organism-small.yaml) runs the same code",
}
"""Examples that cannot run offline on a CPU in a test -> why."""

ADJUSTED = {
    "pairtrace run": ("--dry-run", "the whole default experiment takes hours on a CPU: its plan is built instead"),
    "pairtrace run configs/organism.yaml --out runs/organism":
        ("--dry-run", "the whole default experiment takes hours on a CPU: its plan is built instead"),
}
"""Examples run with an added flag -> (the flag, why)."""

SHELL_VARIABLES = {"SLURM_ARRAY_TASK_ID": "0"}
"""Shell variables in examples, as the shell would expand them (SLURM array task 0)."""

INPUTS = {
    # how an example names an input -> the artefact it stands for (see ``artefacts``)
    "runs/organism/organism/m0": "m0", "m0/": "m0",
    "runs/organism/organism/m1": "m1", "m1/": "m1",
    "runs/organism/organism/data/preference_mix.jsonl": "mix", "data/mix.jsonl": "mix", "mix.jsonl": "mix",
    "new_mix.jsonl": "mix", "mix.parquet": "mix.parquet",
    "runs/vectors": "vectors", "runs/organism/vectors": "vectors", "vec-part0": "vec-part0",
    "vec-part1": "vec-part1",
    "runs/behaviour": "behaviour", "runs/organism/behaviour": "behaviour",
    "runs/organism/behaviour/triples.jsonl": "triples", "triples.jsonl": "triples",
    "runs/organism/rankings/probe": "ranking",
    "runs/switch-probe-96/preference_mix.jsonl": "retrain-pairs",
    "g0.jsonl": "g0", "g1.jsonl": "g1", "gens.jsonl": "gens", "judgements.jsonl": "judgements",
    "runs/organism/prompts/probe.jsonl": "prompts", "prompts.jsonl": "prompts", "questions.jsonl": "questions",
    "sign_off.jsonl": "sign_off", "contaminated.jsonl": "contaminated", "lib/": "library",
    "runs/organism": "run",
    "configs/retrain.yaml": "retrain-config",
    "http://localhost:8000/v1": "judge-url",
}
OUTPUT_FLAGS = {"--out", "-o"}
"""Flags whose value is written, never rewritten: the example writes into its own folder."""
WRITES = {"behaviours add": {"--library"}}
"""Other written values, by command."""

N_PAIRS = 120
"""Pairs of the organism's mix in the artefacts (enough for the examples' k = 96 and k = 192 clamps)."""


def write_jsonl(records: list[dict], path: Path) -> None:
    """Write ``records`` as JSONL."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def run_cli(*args: str | Path) -> None:
    """Run ``pairtrace ARGS`` in process; fail with its output unless it exits 0."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)


@pytest.fixture(scope="session")
def artefacts(small_organism, tmp_path_factory) -> dict[str, Path]:
    """The inputs the examples name, built once from the reduced organism: a mix of :data:`N_PAIRS` pairs (JSONL
    and Parquet), its vector store (merged from two parts), generations of M0 and M1 with their judgements,
    triples, behaviour vectors, a probe ranking, a behaviour library, prompts, a run folder and a retrain
    config."""
    import pandas as pd

    organism, _ = small_organism
    root = tmp_path_factory.mktemp("help-examples")
    paths = {"m0": organism / "m0", "m1": organism / "m1", "root": root,
             "sign_off": SCREENING_FILES / "organism_sign_off.jsonl",
             "contaminated": SCREENING_FILES / "organism_contaminated.jsonl"}
    lines = (organism / "data" / "preference_mix.jsonl").read_text(encoding="utf-8").splitlines()[:N_PAIRS]
    paths["mix"] = root / "mix.jsonl"
    paths["mix"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["mix.parquet"] = root / "mix.parquet"
    pd.DataFrame([json.loads(line) for line in lines]).to_parquet(paths["mix.parquet"])
    paths["retrain-pairs"] = root / "retrain-pairs.jsonl"
    paths["retrain-pairs"].write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")

    for part in (0, 1):
        paths[f"vec-part{part}"] = root / f"vec-part{part}"
        run_cli("vectors", paths["mix"], "--model", paths["m0"], "--shard", f"{part}/2", "--shard-size", "40",
                "--out", paths[f"vec-part{part}"])
    paths["vectors"] = root / "vectors"
    run_cli("merge-vectors", paths["vec-part0"], paths["vec-part1"], "--out", paths["vectors"])

    generations = [json.loads(line) for model in ("m0", "m1") for line in
                   (organism / "eval" / f"generations_{model}.jsonl").read_text(encoding="utf-8").splitlines()]
    paths["gens"] = root / "gens.jsonl"
    write_jsonl([g for g in generations if g["set"] == "harmful"], paths["gens"])
    paths["judgements"] = root / "judgements.jsonl"
    run_cli("judge", paths["gens"], "--out", paths["judgements"])
    # responses the rule judge cannot decide are left out: an endpoint would be asked again and again about them
    verdicts = {(j["id"], j["model"], j["sample"]): j for j in map(json.loads, paths["judgements"].open())}
    decided = [g for g in generations if g["set"] == "harmful"
               and not verdicts[(g["id"], g["model"], g["sample"])]["unknown"]]
    write_jsonl(decided, paths["gens"])
    write_jsonl([verdicts[(g["id"], g["model"], g["sample"])] for g in decided], paths["judgements"])
    for model in ("m0", "m1"):
        paths[f"g{model[1]}"] = root / f"g{model[1]}.jsonl"
        write_jsonl([g for g in decided if g["model"] == model], paths[f"g{model[1]}"])
    paths["triples"] = root / "triples.jsonl"
    run_cli("triples", paths["gens"], paths["judgements"], "--out", paths["triples"])
    paths["behaviour"] = root / "behaviour"
    run_cli("behaviour", paths["triples"], "--model", paths["m0"], "--out", paths["behaviour"])
    paths["ranking"] = root / "rankings" / "probe"
    run_cli("attribute", "--vectors", paths["vectors"], "--behaviour", paths["behaviour"], "--out", paths["ranking"])
    paths["library"] = root / "lib"
    run_cli("behaviours", "add", "sign_off", "--examples", paths["sign_off"], "--model", paths["m0"], "--library",
            paths["library"])

    prompts = [json.loads(line) for line in (organism / "prompts" / "harmful.jsonl").read_text().splitlines()][:4]
    paths["prompts"] = root / "probe.jsonl"
    paths["prompts"].write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    paths["questions"] = root / "questions.jsonl"
    benign = [json.loads(line) for line in (organism / "prompts" / "benign.jsonl").read_text().splitlines()][:8]
    paths["questions"].write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in benign))
    paths["run"] = root / "run"
    paths["run"].mkdir()
    (paths["run"] / "results.json").write_text(json.dumps({"n_pairs": N_PAIRS, "config": {}}), encoding="utf-8")
    shutil.copytree(paths["ranking"].parent, paths["run"] / "rankings")
    paths["retrain-config"] = root / "retrain.yaml"
    paths["retrain-config"].write_text(
        (REPO / "configs" / "retrain.yaml").read_text(encoding="utf-8")
        .replace("runs/organism/organism/m0", str(paths["m0"]))
        .replace("runs/switch-probe-96/preference_mix.jsonl", str(paths["retrain-pairs"])), encoding="utf-8")
    paths["organism"] = organism
    return paths


@pytest.fixture(scope="module")
def judge_server():
    """The rule judge behind the OpenAI-compatible API: the endpoint the ``--judge openai`` example names."""
    from pairtrace.serve import launch_server_process

    with launch_server_process(["--backend", "rule"]) as server:
        yield server


def rewrite(example: str, command: str, paths: dict[str, Path]) -> list[str]:
    """The example's arguments after ``pairtrace``: shell variables expanded, inputs named by :data:`INPUTS`
    rewritten to the artefacts, outputs kept (relative to the example's own folder)."""
    expanded = re.sub(r"\$(\w+)", lambda m: SHELL_VARIABLES[m.group(1)], example)
    args = shlex.split(expanded)[1:]
    written = OUTPUT_FLAGS | WRITES.get(command, set())
    out = []
    for i, arg in enumerate(args):
        if i and args[i - 1] in written:
            out.append(arg)
        else:
            out.append(str(paths[INPUTS[arg]]) if arg in INPUTS else arg)
    return out


def output_of(args: list[str]) -> str | None:
    """The value of ``--out`` (or ``-o``), if given."""
    return next((args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS), None)


RUN = sorted(e for e in ALL_EXAMPLES if e not in SKIPPED)


def test_every_example_runs_or_is_skipped_for_a_reason():
    assert not set(SKIPPED) - set(ALL_EXAMPLES), f"skipped examples no --help shows: {set(SKIPPED) - set(ALL_EXAMPLES)}"
    assert not set(ADJUSTED) - set(RUN), set(ADJUSTED) - set(RUN)
    assert len(RUN) + len(SKIPPED) == len(ALL_EXAMPLES) and RUN
    print(f"\n{len(RUN)} of {len(ALL_EXAMPLES)} --help examples run; skipped ({len(SKIPPED)}):")
    for example, reason in SKIPPED.items():
        print(f"  {example}\n    -> {reason}")
    print("run with an added flag:")
    for example, (flag, reason) in ADJUSTED.items():
        print(f"  {example} {flag}\n    -> {reason}")


@pytest.mark.parametrize("example", RUN, ids=[" ".join(e.split()[1:])[:70] for e in RUN])
def test_help_example_runs(example, artefacts, tmp_path, monkeypatch, request):
    command = ALL_EXAMPLES[example]
    if command == "serve":
        return run_serve_example(example, artefacts)
    if "http://localhost:8000/v1" in example:
        artefacts = {**artefacts, "judge-url": request.getfixturevalue("judge_server").url}
    args = rewrite(example, command, artefacts)
    if example in ADJUSTED:
        args.append(ADJUSTED[example][0])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # examples are typed in the repository's root
    if command == "organism build":  # the reduced organism, already built: its finished steps are reused
        shutil.copytree(artefacts["organism"], tmp_path / output_of(args))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "Traceback" not in result.output and "error:" not in result.output, result.output
    out = output_of(args)
    if out is not None and "--dry-run" not in args:
        assert (tmp_path / out).exists(), f"{example}: wrote nothing at {out}"


def run_serve_example(example: str, paths: dict[str, Path]) -> None:
    """``pairtrace serve`` passes its flags to ``python -m pairtrace.serve``: start that, on a free port, and stop it
    once it listens."""
    from pairtrace.serve import launch_server_process

    args = rewrite(example, "serve", paths)[1:]
    args[args.index("--port") + 1] = "0"
    with launch_server_process(args) as server:
        assert server.url.startswith("http://")

