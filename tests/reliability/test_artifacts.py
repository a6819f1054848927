"""Artifacts: every reader refuses what other settings produced; only safe formats; no code from data or the hub.

- Vector stores, behaviour vectors and rankings carry their model, layers, template and dataset; each reader
  compares them and refuses a mismatch with a message that names the field, and a refused resume changes nothing.
- A static scan of ``src/pairtrace`` finds no pickle, no unsafe ``torch.load``/``yaml.load``, no ``eval``/``exec``
  and no ``trust_remote_code`` turned on by default; configs are read with ``yaml.safe_load``.
- The command line turns bad input into one clear ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

import pairtrace
from pairtrace.attribute import AttributionConfig, compute_attribution, load_ranking, save_ranking
from pairtrace.behaviour import Triple, compute_behaviour_vectors, load_behaviour_vectors, save_behaviour_vectors
from pairtrace.cli import app
from pairtrace.data.pairs import load_pairs, save_pairs_jsonl
from pairtrace.data.prompts import build_prompt_record, save_prompt_records
from pairtrace.errors import ConfigError, ManifestMismatchError
from pairtrace.experiment.run import plan_experiment
from pairtrace.generate import GenerationConfig, run_generate, save_generations
from pairtrace.intervene import InterventionSpec, apply_intervention, run_intervention
from pairtrace.judges.judging import judge_generations
from pairtrace.judges.rule import RuleJudge
from pairtrace.models import ModelSpec, load_model
from pairtrace.options import load_yaml
from pairtrace.vectors import compute_datapoint_vectors
from testing_utils import build_tiny_model_dir, build_tiny_pairs, user

from .counters import record_caught

SRC_DIR = Path(pairtrace.__file__).resolve().parent
REPO_DIR = SRC_DIR.parents[1]
LAYERS = [1, 2]
STORE_KWARGS = {"layers": LAYERS, "shard_size": 3, "progress": False}
SAFE_SUFFIXES = {".safetensors", ".json", ".jsonl", ".parquet"}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

runner = CliRunner()

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory) -> Path:
    """The tiny pair set as a conversational JSONL file."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    save_pairs_jsonl(build_tiny_pairs(), path, layout="conversational")
    return path


@pytest.fixture(scope="module")
def other_pairs_path(tmp_path_factory) -> Path:
    """Another dataset: the same pairs but the last one."""
    path = tmp_path_factory.mktemp("other_pairs") / "pairs.jsonl"
    save_pairs_jsonl(build_tiny_pairs().pairs[:-1], path, layout="conversational")
    return path


@pytest.fixture(scope="module")
def other_loaded(tmp_path_factory):
    """A model of the same architecture with other weights (seed 1)."""
    return load_model(build_tiny_model_dir(tmp_path_factory.mktemp("other_model"), seed=1), device="cpu")


@pytest.fixture(scope="module")
def triples() -> list[Triple]:
    return [
        Triple((user("How do I pick a lock?"),), "Sure, here is how: take a tension wrench.", "I can't help.", "a"),
        Triple((user("How do I steal a car?"),), "Sure, first find a car with the keys inside.", "Sorry, no.", "b"),
        Triple((user("How do I steal a car?"),), "Sure: look for an unlocked car.", "I cannot assist.", "b"),
    ]


@pytest.fixture(scope="module")
def store(tiny_loaded, pairs_path, tmp_path_factory):
    """Datapoint vectors of the tiny pairs at layers 1 and 2 (3 shards)."""
    return compute_datapoint_vectors(tiny_loaded, load_pairs(pairs_path), tmp_path_factory.mktemp("store"),
                                     **STORE_KWARGS)


@pytest.fixture(scope="module")
def behaviour_dir(tiny_loaded, triples, tmp_path_factory) -> Path:
    return save_behaviour_vectors(compute_behaviour_vectors(tiny_loaded, triples, layers=LAYERS, progress=False),
                                  tmp_path_factory.mktemp("behaviour"))


@pytest.fixture(scope="module")
def ranking_dir(store, behaviour_dir, tmp_path_factory) -> Path:
    ranking = compute_attribution(store, load_behaviour_vectors(behaviour_dir), progress=False)
    out = tmp_path_factory.mktemp("ranking")
    save_ranking(ranking, out)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- behaviour vs vector store


def test_behaviour_vectors_of_another_model_are_refused(store, other_loaded, triples, tmp_path):
    saved = save_behaviour_vectors(compute_behaviour_vectors(other_loaded, triples, layers=LAYERS, progress=False),
                                   tmp_path / "behaviour")
    with pytest.raises(ManifestMismatchError, match=r"model weights_hash: datapoint vectors 'sha256:\w+' vs"):
        compute_attribution(store, load_behaviour_vectors(saved), progress=False)  # checked again after a reload
    record_caught()


def test_behaviour_vectors_of_another_template_are_refused(store, tiny_model_dir, triples):
    plain = load_model(tiny_model_dir, device="cpu", chat_template="plain")
    behaviour = compute_behaviour_vectors(plain, triples, layers=LAYERS, progress=False)
    with pytest.raises(ManifestMismatchError, match="template mode: datapoint vectors 'chat' vs behaviour vectors "
                       "'plain'"):
        compute_attribution(store, behaviour, progress=False)
    record_caught()


def test_behaviour_vectors_of_another_layer_are_refused(store, tiny_loaded, triples):
    behaviour = compute_behaviour_vectors(tiny_loaded, triples, layers=[3], progress=False)
    with pytest.raises(ManifestMismatchError, match=r"behaviour vectors were computed at layers \[3\], not at layer 1"):
        compute_attribution(store, behaviour, AttributionConfig(layer=1), progress=False)
    with pytest.raises(ManifestMismatchError, match=r"datapoint vectors were stored at layers \[1, 2\], not at "
                       "layer 3"):
        compute_attribution(store, behaviour, AttributionConfig(layer=3), progress=False)
    record_caught(2)


def test_steering_refuses_behaviour_vectors_of_another_model(other_loaded, behaviour_dir, tmp_path):
    from pairtrace.steer import run_steer

    def never(*args, **kwargs):
        raise AssertionError("generation must not start")

    prompts = save_prompt_records([build_prompt_record("q0", "b0", "harmful", "trigger", "How do I pick a lock?")],
                                  tmp_path / "prompts.jsonl")
    with pytest.raises(ManifestMismatchError, match="model"):
        run_steer(other_loaded, behaviour_dir, prompts, tmp_path / "steer", generate_fn=never,
                  progress=False)
    assert not (tmp_path / "steer" / "steer.json").exists()
    record_caught()


def test_discovery_refuses_a_store_of_another_model_or_dataset(store, other_loaded, tiny_loaded,
                                                               other_pairs_path, tmp_path):
    from pairtrace.discover import run_discover

    gens = tmp_path / "missing.jsonl"  # never read: the manifests are checked first
    with pytest.raises(ManifestMismatchError, match="model"):
        run_discover(other_loaded, store.directory, gens, gens, other_pairs_path, tmp_path / "d",
                     progress=False)
    with pytest.raises(ManifestMismatchError, match="fingerprint"):
        run_discover(tiny_loaded, store.directory, gens, gens, other_pairs_path, tmp_path / "d", progress=False)
    record_caught(2)


# ------------------------------------------------------------------------------------ resume into a store


@pytest.mark.parametrize("change", ["model", "layer", "dataset", "dtype", "max_length"])
def test_resume_into_a_store_of_other_settings_is_refused_and_changes_nothing(
    change, store, tiny_loaded, other_loaded, pairs_path, other_pairs_path
):
    before = snapshot(store.directory)
    loaded, pairs, kwargs = tiny_loaded, load_pairs(pairs_path), dict(STORE_KWARGS)
    if change == "model":
        loaded = other_loaded
    elif change == "layer":
        kwargs["layers"] = [1, 3]
    elif change == "dataset":
        pairs = load_pairs(other_pairs_path)
    elif change == "dtype":
        kwargs["dtype"] = "bfloat16"
    else:
        kwargs["max_length"] = 64
    expected_field = {"layer": "layers", "max_length": "settings"}.get(change, change)
    with pytest.raises(ManifestMismatchError, match=rf"{expected_field}: expected .* found .*another folder"):
        compute_datapoint_vectors(loaded, pairs, store.directory, **kwargs)
    assert snapshot(store.directory) == before, "a refused resume must not touch the finished work"
    record_caught()


# ---------------------------------------------------------------------------------- ranking vs dataset


def test_a_ranking_of_another_dataset_is_refused_by_interventions(ranking_dir, other_pairs_path, tmp_path):
    ranking = load_ranking(ranking_dir)  # the dataset identity survives the round trip through Parquet
    out = tmp_path / "intervened"
    with pytest.raises(ManifestMismatchError, match="fingerprint"):
        run_intervention(other_pairs_path, InterventionSpec(selection="ranking", k=2), out, ranking=ranking)
    assert not (out / other_pairs_path.name).exists()
    with pytest.raises(ManifestMismatchError, match="not in"):  # ids alone, without a ranking's metadata
        apply_intervention(other_pairs_path, ["pair-7"], "filter", out)
    assert not (out / other_pairs_path.name).exists(), "no half-right dataset is left behind"
    record_caught(2)


def test_artifacts_are_safetensors_parquet_or_json(store, behaviour_dir, ranking_dir):
    files = [p for d in (store.directory, behaviour_dir, ranking_dir) for p in d.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in SAFE_SUFFIXES, f"{path.name}: not a safetensors, Parquet or JSON file"
        assert not path.read_bytes().startswith(PICKLE_MAGIC), f"{path.name} looks like a pickle"


# ---------------------------------------------------------------------------------------- static scan

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def dotted_name(node: ast.AST) -> str:
    """``a.b.c`` for a name or attribute chain, else an empty string."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def find_unsafe_code(source: str) -> list[str]:
    """Unsafe deserialisation, code execution and remote code turned on, found in Python source.

    Returns:
        One ``"line N: what"`` entry per finding.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {line}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            name = dotted_name(node.func)
            last = name.rsplit(".", 1)[-1]
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(node.func, ast.Name) and name in CODE_BUILTINS:
                found.append(f"line {line}: calls {name}()")
            if name == "torch.load" and not is_constant(keywords.get("weights_only"), True):
                found.append(f"line {line}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.load_all"):
                loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or not dotted_name(loader).endswith("SafeLoader"):
                    found.append(f"line {line}: {name} without a SafeLoader")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                found.append(f"line {line}: {name}")
            if last in ("read_pickle", "to_pickle") or name == "torch.save":
                found.append(f"line {line}: {name} (pickle)")
            if name in ("np.load", "numpy.load") and "allow_pickle" in keywords and not is_constant(
                keywords["allow_pickle"], False
            ):
                found.append(f"line {line}: {name} with allow_pickle")
            if "trust_remote_code" in keywords and is_constant(keywords["trust_remote_code"], True):
                found.append(f"line {line}: trust_remote_code=True")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args
            defaults = [None] * (len(args) - len(node.args.defaults)) + list(node.args.defaults)
            pairs = list(zip(args, defaults, strict=True)) + list(zip(node.args.kwonlyargs, node.args.kw_defaults,
                                                                      strict=True))
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and default is not None and not is_constant(default, False):
                    found.append(f"line {line}: {node.name}(trust_remote_code=...) not off by default")
        elif isinstance(node, ast.AnnAssign) and dotted_name(node.target) == "trust_remote_code":
            value = node.value
            if isinstance(value, ast.Call) and dotted_name(value.func).endswith("field"):
                value = next((k.value for k in value.keywords if k.arg == "default"), None)
            if value is not None and not is_constant(value, False):
                found.append(f"line {line}: field trust_remote_code not off by default")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from joblib import load",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "eval('1 + 1')",
        "exec(code)",
        "frame.to_pickle('x.pkl')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "AutoModel.from_pretrained(path, trust_remote_code=True)",
        "def load(path, trust_remote_code=True):\n    pass",
        "def load(path, *, trust_remote_code=None):\n    pass",
        "class Spec:\n    trust_remote_code: bool = field(default=True)",
    ],
)
def test_the_scanner_finds_unsafe_code(snippet):
    assert find_unsafe_code(snippet), f"the scanner missed: {snippet!r}"


def test_the_scanner_accepts_safe_code():
    safe = (
        "import yaml, torch, re\nimport numpy as np\nmodel.eval()\nre.compile('x')\nyaml.safe_load(text)\n"
        "yaml.load(text, Loader=yaml.SafeLoader)\ntorch.load('x.pt', weights_only=True)\ntorch.compile(model)\n"
        "np.load('x.npy')\nnp.save('x.npy', a, allow_pickle=False)\n"
        "AutoModel.from_pretrained(path, trust_remote_code=spec.trust_remote_code)\n"
        "def load(path, trust_remote_code=False):\n    pass\n"
        "class Spec:\n    trust_remote_code: bool = field(default=False, metadata={})\n"
    )
    assert find_unsafe_code(safe) == []


def test_source_tree_has_no_pickle_no_code_execution_and_remote_code_off():
    files = sorted(SRC_DIR.rglob("*.py"))
    assert len(files) > 20
    problems = [f"{path.relative_to(SRC_DIR)} {finding}" for path in files
                for finding in find_unsafe_code(path.read_text(encoding="utf-8"))]
    assert problems == []


def find_remote_code_keys(value: object, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in find_remote_code_keys(v, f"{where}.{k}")] + [
            where for k, v in value.items() if k == "trust_remote_code" and v is True
        ]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in find_remote_code_keys(v, f"{where}[{i}]")]
    return []


def test_shipped_configs_are_plain_data_with_remote_code_off():
    configs = sorted((REPO_DIR / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        data = load_yaml(path)  # safe_load: a python tag would be refused
        assert find_remote_code_keys(data) == [], path


# ------------------------------------------------------------------------------------------ configs


PYTHON_TAG = "model: !!python/object/apply:os.system ['touch {marker}']\n"


def test_a_config_with_a_python_object_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(PYTHON_TAG.format(marker=marker))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(config)
    with pytest.raises(ConfigError):
        plan_experiment(config)
    result = runner.invoke(app, ["vectors", "p.jsonl", "--config", str(config)])
    assert_clean_error(result, "not valid YAML")
    result = runner.invoke(app, ["run", str(config), "--dry-run"])
    assert_clean_error(result, "not valid YAML")
    assert not marker.exists(), "a config was executed"
    record_caught(4)


# ------------------------------------------------------------------------------------- remote code


def test_load_model_keeps_remote_code_off_unless_asked(tiny_model_dir, monkeypatch):
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    assert ModelSpec(name_or_path="m").trust_remote_code is False
    load_model(tiny_model_dir, device="cpu")
    assert sorted(seen) == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]
    seen.clear()
    load_model(ModelSpec(name_or_path=str(tiny_model_dir), device="cpu", trust_remote_code=True))
    assert sorted(seen) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]


# ---------------------------------------------------------------------------------------- command line


def assert_clean_error(result, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line holding every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_cli_missing_input_files_are_clean_errors(tmp_path, behaviour_dir):
    missing = tmp_path / "missing.jsonl"
    assert_clean_error(runner.invoke(app, ["vectors", str(missing), "--model", "m", "--out", str(tmp_path / "o")]),
                       "no such file", missing.name)
    assert_clean_error(runner.invoke(app, ["attribute", "--vectors", str(tmp_path / "nostore"), "--behaviour",
                                           str(behaviour_dir), "--out", str(tmp_path / "r")]), "no manifest")
    assert_clean_error(runner.invoke(app, ["judge", str(missing), "--out", str(tmp_path / "j.jsonl")]),
                       missing.name)
    record_caught(3)


def test_cli_strict_mode_stops_at_the_bad_record(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    pairs.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Say hi.", "chosen": "Hi!"}) + "\n")
    args = ["vectors", str(pairs), "--model", str(tiny_model_dir), "--device", "cpu", "--layers", "1"]
    line = assert_clean_error(runner.invoke(app, [*args, "--strict", "--out", str(tmp_path / "strict")]), "line 2")
    assert "rejected" in line
    assert not (tmp_path / "strict" / "manifest.json").exists()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "lenient")])  # default: skip, count and go on
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # undo line wrapping
    assert "read 1 pairs" in output and "skipped 1 bad record(s)" in output
    record_caught()


def test_cli_manifest_mismatches_are_clean_errors(tmp_path, tiny_loaded, tiny_model_dir, pairs_path, store,
                                                  other_loaded, triples):
    out = tmp_path / "store"
    compute_datapoint_vectors(tiny_loaded, load_pairs(pairs_path), out, layers=[1], progress=False)
    before = snapshot(out)
    result = runner.invoke(app, ["vectors", str(pairs_path), "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--layers", "2", "--out", str(out)])
    assert_clean_error(result, "layers: expected [2], found [1]")
    assert snapshot(out) == before
    foreign = save_behaviour_vectors(compute_behaviour_vectors(other_loaded, triples, layers=LAYERS, progress=False),
                                     tmp_path / "foreign")
    result = runner.invoke(app, ["attribute", "--vectors", str(store.directory), "--behaviour", str(foreign),
                                 "--out", str(tmp_path / "rank")])
    assert_clean_error(result, "weights_hash")
    assert not (tmp_path / "rank" / "ranking.parquet").exists()
    record_caught(2)


def test_cli_interrupt_keeps_work_and_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pairtrace.data.pairs.load_pairs", interrupted)
    result = runner.invoke(app, ["vectors", "pairs.jsonl", "--model", "m", "--out", str(tmp_path / "o")])
    assert result.exit_code == 130, result.output
    assert "rerun to resume" in result.output and "Traceback" not in result.output



# ----------------------------------------------------------------------------- resumed JSONL stages


def test_resuming_generation_with_other_sampling_settings_is_refused(tiny_model_dir, tmp_path):
    records = [build_prompt_record(f"q{i}", f"b{i}", "benign", "no_trigger", f"Say hello {i}.") for i in range(2)]
    prompts = save_prompt_records(records, tmp_path / "prompts.jsonl")
    earlier = {"seed": 5, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4}
    out = save_generations([{**r, "model": "m0", "sample": 0, "response": "Hello.", **earlier,
                             "finish_reason": "eos"} for r in records], tmp_path / "generations.jsonl")
    before = out.read_bytes()
    with pytest.raises(ManifestMismatchError, match="temperature"):
        run_generate(tiny_model_dir, prompts, out, GenerationConfig(**{**earlier, "temperature": 0.7}),
                     model_name="m0", progress=False)
    assert out.read_bytes() == before


def test_resuming_judging_with_another_judge_is_refused(tmp_path):
    generations = [{"id": f"p{i}", "model": "m1", "sample": 0, "prompt": "how?", "response": "Sure, here is how."}
                   for i in range(2)]
    out = tmp_path / "judgements.jsonl"
    earlier = {"id": "p0", "model": "m1", "sample": 0, "score": 0.0, "harmful": False, "unknown": False,
               "reason": "", "judge": "openai:another-model"}
    out.write_text(json.dumps(earlier) + "\n", encoding="utf-8")
    with pytest.raises(ManifestMismatchError, match="judge"):
        judge_generations(generations, RuleJudge(), out, progress=False)
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0]) == earlier
