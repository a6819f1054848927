"""The CPU rehearsal of the paper's code path, reduced: hub ids at a pinned revision read offline from a local cache,
the chat template, dtype auto, the OpenAI-compatible judge through a local server, the baseline retrained with the
accelerate engine in 2 processes and again with the command engine (compared within the stated tolerance)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reduced_rehearsal_runs_the_real_engine_paths(small_organism, tmp_path: Path) -> None:
    organism_dir, _ = small_organism
    out = tmp_path / "rehearsal"
    shutil.copytree(organism_dir, out / "inputs" / "organism")  # its build stamps match: nothing is rebuilt
    config = yaml.safe_load((ROOT / "configs" / "rehearsal.yaml").read_text(encoding="utf-8"))
    config["judge"]["base_url"] = f"http://127.0.0.1:{_free_port()}/v1"
    config["attribution"]["methods"] = ["probe", "random"]
    config["validation"].update(headline_methods=[], sweep_methods=[])  # the baseline retrain only
    config["extras"].update(discover=False, steer=False, sources=False)
    config["generation"].update(probe_samples=2, eval_samples=1, max_new_tokens=32)
    config["validation"]["recipe"]["epochs"] = 1
    path = tmp_path / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rehearsal.py"), "--config", str(path),
                           "--organism", str(ROOT / "configs" / "organism-small.yaml"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "rehearsal.json").read_text(encoding="utf-8"))
    assert summary["engines"]["retrain"] == "accelerate" and summary["engines"]["probe_generations"] == "hf"
    assert summary["models"]["m0"] == config["models"]["m0"] and summary["models"]["m0_revision"]
    assert summary["models"]["template"] == "chat"
    assert summary["command_engine"]["engine"] == "command" and summary["command_engine"]["ok"]
    # the judge answered through the endpoint: probing samples were judged, none left unknown for lack of a server
    judgements = [json.loads(line) for line in (out / "run" / "probe" / "judgements.jsonl").open(encoding="utf-8")]
    assert judgements and sum(bool(j["unknown"]) for j in judgements) < len(judgements) / 2
    # the models were read from the local hub cache at the pinned revision
    snapshot = out / "inputs" / "hub" / "models--pairtrace-rehearsal--organism-small-m0" / "snapshots"
    assert (snapshot / config["models"]["m0_revision"] / "model.safetensors").is_file()
