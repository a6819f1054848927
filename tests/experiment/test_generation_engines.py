"""Generation engines: the backend setting, the one dispatch function, and the run's use of it.

The Hugging Face path runs here; the vLLM path runs only where vLLM imports and a CUDA GPU is present.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pairtrace import generation_engines
from pairtrace.data.prompts import build_prompt_record
from pairtrace.errors import ConfigError
from pairtrace.experiment import run as run_module
from pairtrace.experiment import validation
from pairtrace.experiment.context import Inputs, RunContext
from pairtrace.experiment.run_config import build_run_config, load_run_config
from pairtrace.generate import GenerationConfig, generate_responses
from pairtrace.generation_engines import generate_with, resolve_engine
from pairtrace.models import ModelSpec
from pairtrace.stage_cache import chain_key
from pairtrace.vllm_backend import vllm_available


def _prompts(n: int = 3) -> list[dict[str, Any]]:
    return [build_prompt_record(f"p{i}:no_trigger", f"p{i}", "benign", "no_trigger", f"Say something about {i}.")
            for i in range(n)]


@pytest.mark.parametrize(("backend", "device", "usable", "engine"), [
    ("auto", "auto", True, "vllm"),
    ("auto", "cuda", True, "vllm"),
    ("auto", "cpu", True, "hf"),
    ("auto", "auto", False, "hf"),
    ("hf", "cuda", True, "hf"),
    ("vllm", "cuda", True, "vllm"),
])
def test_resolve_engine(monkeypatch: pytest.MonkeyPatch, backend: str, device: str, usable: bool,
                        engine: str) -> None:
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: usable)
    assert resolve_engine(backend, device) == engine


def test_vllm_backend_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: False)
    with pytest.raises(ConfigError, match=r"generation\.backend is 'vllm'.*vllm package and a CUDA GPU"):
        resolve_engine("vllm", "auto")
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: True)
    with pytest.raises(ConfigError, match=r"generation\.backend is 'vllm' but the models' device is 'cpu'"):
        resolve_engine("vllm", "cpu")
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_engine("tgi")


def test_backend_is_a_generation_option() -> None:
    assert GenerationConfig().backend == "auto"
    with pytest.raises(ConfigError, match=r"\{backend\}|backend"):
        GenerationConfig(backend="tgi")
    with pytest.raises(ConfigError, match=r"generation\.backend"):
        build_run_config({"models": {"m0": "a", "m1": "b"}, "data": {"pairs": "p"},
                          "generation": {"backend": "tgi"}})


def test_hf_dispatch_gives_the_records_of_generate_responses(tiny_loaded, tiny_model_dir: Path,
                                                             one_torch_thread) -> None:
    """Same records, bit for bit, through generate_with (a loaded model or a spec) and generate_responses."""
    config = GenerationConfig(temperature=0.7, max_new_tokens=6, n_samples=2, batch_size=4, seed=3, backend="hf")
    direct = generate_responses(tiny_loaded, _prompts(), config, model_name="m0", progress=False)
    loaded = generate_with(tiny_loaded, _prompts(), config, model_name="m0", progress=False)
    spec = ModelSpec(name_or_path=str(tiny_model_dir), device="cpu")
    from_spec = generate_with(spec, _prompts(), config, model_name="m0", engine="hf", progress=False)
    assert loaded == direct and from_spec == direct and len(direct) == 6


@pytest.mark.skipif(not vllm_available(), reason="vLLM path needs the vllm package and a CUDA GPU (not here)")
def test_vllm_dispatch_writes_the_same_record_layout(tiny_model_dir: Path) -> None:  # pragma: no cover - GPU only
    """On a GPU with vLLM: same record keys and fields as Hugging Face, seeded (two runs agree)."""
    config = GenerationConfig(temperature=0.7, max_new_tokens=6, n_samples=2, seed=3, backend="vllm")
    spec = ModelSpec(name_or_path=str(tiny_model_dir), dtype="float32", device="cuda")
    first = generate_with(spec, _prompts(), config, model_name="m0", progress=False)
    again = generate_with(spec, _prompts(), config, model_name="m0", progress=False)
    hf = generate_with(spec, _prompts(), dataclasses.replace(config, backend="hf"), model_name="m0", progress=False)
    assert [(r["id"], r["sample"]) for r in first] == [(r["id"], r["sample"]) for r in hf]
    assert all(set(a) == set(b) for a, b in zip(first, hf, strict=True))
    assert [r["response"] for r in first] == [r["response"] for r in again]


def _local_config(tmp_path: Path, backend: str) -> Path:
    for name in ("m0", "m1"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p1", "prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _prompts(2)))
    config = {"models": {"m0": str(tmp_path / "m0"), "m1": str(tmp_path / "m1"), "device": "cuda"},
              "data": {"pairs": str(pairs)}, "prompts": {"probe": [str(prompts)], "eval": [str(prompts)]},
              "generation": {"backend": backend}, "attribution": {"methods": ["probe", "random"]},
              "validation": {"headline_methods": ["probe", "random"], "sweep_methods": []}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_run_with_vllm_backend_fails_at_the_start_without_vllm(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """generation.backend: vllm where vLLM cannot run stops the run before inputs are resolved or a model loads."""
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: False)
    started: list[str] = []
    monkeypatch.setattr(run_module, "resolve_inputs", lambda ctx: started.append("inputs"))
    ctx = RunContext(load_run_config(_local_config(tmp_path, "vllm")), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"generation\.backend is 'vllm' but vLLM cannot run on this machine"):
        run_module.execute(ctx)
    assert started == [] and ctx.model_loads == []


def _context(tmp_path: Path, backend: str) -> RunContext:
    config = load_run_config(_local_config(tmp_path, backend))
    prompts = str(tmp_path / "prompts.jsonl")
    inputs = Inputs(m0=str(tmp_path / "m0"), m1=str(tmp_path / "m1"), pairs=str(tmp_path / "pairs.jsonl"),
                    probe_prompts=prompts, eval_prompts=prompts, ref_cache=str(tmp_path / "ref"))
    return RunContext(config, tmp_path / "out", progress=False, inputs=inputs)


class _NoJudge:
    pass


def test_vllm_generation_gets_the_spec_and_never_loads_the_hf_model(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: True)
    received: list[tuple[Any, str | None, GenerationConfig]] = []

    def fake_generate_with(model, records, config, *, model_name, engine=None, **kwargs):
        received.append((model, engine, config))
        return [{**r, "model": model_name, "sample": 0, "response": "ok"} for r in records]

    monkeypatch.setattr(generation_engines, "generate_with", fake_generate_with)
    monkeypatch.setattr("pairtrace.judges.judging.judge_generations", lambda *a, **k: None)
    ctx = _context(tmp_path, "auto")
    monkeypatch.setattr(ctx, "judge", lambda: _NoJudge())
    out = validation.generate_and_judge(ctx, "probe", ["m0", "m1"], ctx.inputs.probe_prompts, 3, seed_offset=1)
    assert out["engine"] == "vllm" and ctx.model_loads == []
    assert [type(m).__name__ for m, _, _ in received] == ["ModelSpec", "ModelSpec"]
    assert received[0][0].device == "cuda" and received[0][0].name_or_path == str(tmp_path / "m0")
    assert all(e == "vllm" and c.n_samples == 3 and c.seed == 1 for _, e, c in received)
    assert json.loads((tmp_path / "out" / "probe" / "engine.json").read_text())["engine"] == "vllm"


def test_generation_key_keeps_hf_keys_and_separates_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Hugging Face the stage key of the sampling settings is the one made before the backend option existed."""
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: False)
    ctx = _context(tmp_path, "auto")
    before = {k: v for k, v in dataclasses.asdict(ctx.config.generation).items() if k != "backend"}
    assert chain_key(ctx.generation_key()) == chain_key(before)
    monkeypatch.setattr(generation_engines, "vllm_usable", lambda: True)
    vllm_ctx = _context(tmp_path / "v", "auto")
    assert vllm_ctx.generation_key() == {**before, "engine": "vllm"}
