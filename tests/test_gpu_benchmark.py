"""The prepared GPU check (benchmarks/gpu_throughput.py) on a CPU-only machine: a clear exit without a GPU, and
every part of its CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_a_gpu_it_says_so_and_exits_cleanly() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_dry_run_runs_every_check_but_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread) -> None:
    spec = importlib.util.spec_from_file_location("gpu_throughput_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--dry-run", "--seconds", "0.1"]) == 0
    checks = json.loads((tmp_path / "gpu_throughput.json").read_text())["checks"]
    assert checks["shared_vs_plain"]["max_relative_difference"] < 1e-5
    assert checks["shared_vs_plain"]["always"]["tokens_run"] < checks["shared_vs_plain"]["never"]["tokens_run"]
    assert checks["bf16_agreement"]["min_cosine"] > 0.9
    assert checks["vllm_generation"] == "skipped: no CUDA device"
