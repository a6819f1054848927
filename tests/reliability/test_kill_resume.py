"""Interrupted runs: each resumable stage is killed (SIGKILL) at seeded random points, then resumed to completion.

For extraction, generation and judging, a child process runs the stage's real entry point on a deliberately slow
model / disk / judge (sleeps only: the bytes it writes are unchanged), the parent kills it several times at random
delays after it starts or makes progress, checks what each kill left behind, and finally resumes in-process. The
result must be byte-identical to an uninterrupted run, with nothing lost and nothing written twice.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pairtrace.data.pairs import load_pairs
from pairtrace.data.paths import shared_data_dir
from pairtrace.data.prompts import build_prompt_record, save_prompt_records
from pairtrace.errors import DataError
from pairtrace.generate import GenerationConfig, load_generations, run_generate
from pairtrace.judges.judging import judge_generations, load_judgements
from pairtrace.judges.rule import RuleJudge
from pairtrace.store import MANIFEST_NAME, Manifest, VectorStore, shard_path
from pairtrace.vectors import compute_datapoint_vectors

from .counters import KILL_CYCLES, record

SEED = 2602_11079
"""Seeds the kill delays (the paper's arXiv number)."""
THREADS = torch.get_num_threads()
"""Children compute with the parent's thread count, so that their float results are bit-identical."""
CHILD_TIMEOUT_S = 120.0

# ----------------------------------------------------------------------------------------------- helpers


def spawn(script: str, args: list[object], log: Path) -> subprocess.Popen:
    """Start ``python -c script args...`` with stderr into ``log``."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.DEVNULL, stderr=handle
        )


def kill_after_progress(child: subprocess.Popen, progressed: Callable[[], bool], delay_s: float, log: Path) -> None:
    """Wait until ``progressed()`` holds, then ``delay_s`` more, then SIGKILL the child; it must still be running."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while not progressed():
            if child.poll() is not None:
                pytest.fail(f"the child exited ({child.returncode}) before making progress:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child made no progress in {CHILD_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.01)
        time.sleep(delay_s)
    finally:
        child.send_signal(signal.SIGKILL)  # a no-op if the child already exited
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, (
        f"the child finished (exit code {child.returncode}) before it could be killed:\n{log.read_text()}"
    )


def complete_lines(path: Path) -> bytes:
    """The bytes of a JSONL file up to its last newline (what a reader may use; the rest is a torn line)."""
    if not path.exists():
        return b""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def count_lines(path: Path) -> int:
    return complete_lines(path).count(b"\n")


# -------------------------------------------------------------------------------------------- extraction

N_PAIRS = 60
EXTRACT_KWARGS = {"layers": [1, 3], "shard_size": 2, "batch_tokens": 512, "max_length": 128, "progress": False}
"""30 shards of 2 HH-RLHF pairs, truncated to 128 tokens: many small units of resumption."""
EXTRACT_DELAY_S = 0.04
"""Pause per forward pass and in the middle of each shard write in the child: at least 0.08 s per shard."""

EXTRACT_CHILD = r"""
import json, sys, time
import torch
pairs_path, n_pairs, model_dir, out_dir, threads, delay, kwargs = sys.argv[1:8]
torch.set_num_threads(int(threads))
delay = float(delay)
import safetensors.torch

serialise = safetensors.torch.save

def slow_save_file(tensors, filename, metadata=None):
    # a slow disk: half of the file, a pause, the rest (the same bytes as safetensors.torch.save_file)
    data = serialise(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(delay)
        handle.write(data[len(data) // 2 :])

safetensors.torch.save_file = slow_save_file  # before pairtrace imports it
from pairtrace.data.pairs import load_pairs
from pairtrace.models import load_model
from pairtrace.vectors import compute_datapoint_vectors

loaded = load_model(model_dir, device="cpu")
loaded.model.register_forward_pre_hook(lambda module, args: time.sleep(delay))  # a slow model
pairs = load_pairs(pairs_path, limit=int(n_pairs))
compute_datapoint_vectors(loaded, pairs, out_dir, **json.loads(kwargs))
"""


@pytest.fixture(scope="module")
def hh_pairs_path() -> Path:
    """Real, messy preference data: HH-RLHF harmless-base test dialogues."""
    return shared_data_dir() / "hh_rlhf_harmless_base_test.jsonl.gz"


def test_extraction_killed_three_times_resumes_bit_identical(tiny_model_dir, tiny_loaded, hh_pairs_path, tmp_path):
    rng = random.Random(SEED)
    pairs = load_pairs(hh_pairs_path, limit=N_PAIRS)
    reference = compute_datapoint_vectors(tiny_loaded, pairs, tmp_path / "reference", **EXTRACT_KWARGS)
    n_shards = reference.manifest.n_shards
    assert n_shards == 30
    ref_bytes = {i: shard_path(reference.directory, i).read_bytes() for i in range(n_shards)}
    ref_rows = {k: reference.load(k) for k in EXTRACT_KWARGS["layers"]}

    out, log = tmp_path / "interrupted", tmp_path / "child.log"
    args = [hh_pairs_path, N_PAIRS, tiny_model_dir, out, THREADS, EXTRACT_DELAY_S, json.dumps(EXTRACT_KWARGS)]
    torn_seen = 0
    for cycle in range(3):
        before = len(list(out.glob("shard-*.safetensors")))
        if cycle == 0:  # kill at a random moment after the run starts (possibly before any shard is written)
            progressed = (out / MANIFEST_NAME).exists
        else:  # kill at a random moment after this run wrote at least one more shard

            def progressed(before=before):
                return len(list(out.glob("shard-*.safetensors"))) > before

        kill_after_progress(spawn(EXTRACT_CHILD, args, log), progressed, rng.uniform(0.0, 0.4), log)

        # Whatever a kill leaves, every visible shard is whole: byte-identical to the uninterrupted run's.
        present = sorted(int(p.name[6:11]) for p in out.glob("shard-*.safetensors"))
        assert len(present) < n_shards, "the kill came too late: nothing left to resume"
        for i in present:
            assert shard_path(out, i).read_bytes() == ref_bytes[i], f"cycle {cycle}: shard {i} is torn"
        torn_seen += len(list(out.glob(".*.tmp")))
        with pytest.raises(DataError, match="incomplete"):
            VectorStore.open(out)
        partial = VectorStore.open(out, allow_incomplete=True)
        rows = torch.zeros(N_PAIRS, dtype=torch.bool)
        for i in present:
            rows[2 * i : 2 * i + 2] = True
        assert torch.equal(partial.valid_mask(), rows & reference.valid_mask())
        for k, expected in ref_rows.items():
            got = partial.load(k)
            assert torch.equal(got[rows], expected[rows])
            assert torch.isnan(got[~rows]).all()  # missing shards read as NaN, never as zeros

    # What a kill in the middle of a shard write leaves: a half-written temporary file. It is never read.
    missing = next(i for i in range(n_shards) if not shard_path(out, i).exists())
    planted = out / f".{shard_path(out, missing).name}.killed.tmp"
    planted.write_bytes(ref_bytes[missing][: len(ref_bytes[missing]) // 2])

    resumed = compute_datapoint_vectors(tiny_loaded, load_pairs(hh_pairs_path, limit=N_PAIRS), out, **EXTRACT_KWARGS)
    print(f"extraction: 3 kills, {torn_seen} torn temporary file(s) found after them, resumed to {n_shards} shards")
    assert not list(out.glob(".*.tmp"))
    assert resumed.complete
    for i in range(n_shards):
        assert shard_path(out, i).read_bytes() == ref_bytes[i], f"shard {i} differs from the uninterrupted run"
    ours, theirs = Manifest.load(out).to_dict(), reference.manifest.to_dict()
    ours.pop("created"), theirs.pop("created")
    assert ours == theirs
    record(KILL_CYCLES, 3)
    record("torn temporary files found after kills", torn_seen)


# -------------------------------------------------------------------------------------------- generation

GEN_CONFIG = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 6, "n_samples": 1, "batch_size": 2, "seed": 11}
GEN_DELAY_S = 0.02
"""Pause per forward step in the child: at least 0.12 s per batch of 6 new tokens."""

GEN_CHILD = r"""
import json, sys, time
import torch
prompts, model_dir, out, threads, delay, config = sys.argv[1:7]
torch.set_num_threads(int(threads))
import pairtrace.models
from pairtrace.generate import GenerationConfig, run_generate

load_model = pairtrace.models.load_model

def load_slow_model(*args, **kwargs):  # a slow model: every forward step pauses
    loaded = load_model(*args, **kwargs)
    loaded.model.register_forward_pre_hook(lambda module, inputs: time.sleep(float(delay)))
    return loaded

pairtrace.models.load_model = load_slow_model
run_generate(model_dir, prompts, out, GenerationConfig(**json.loads(config)), model_name="m0", progress=False)
"""


@pytest.fixture(scope="module")
def generation_reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, bytes]:
    """16 prompt records of varied lengths and their uninterrupted generation file."""
    directory = tmp_path_factory.mktemp("generation")
    text = "tell me a short story about the sea and a robot who learns to paint"
    records = [
        build_prompt_record(f"q{i}", f"b{i}", "benign", "no_trigger", text[: 15 + (i * 23) % 52] + f" #{i}")
        for i in range(16)
    ]
    prompts = save_prompt_records(records, directory / "prompts.jsonl")
    reference = directory / "reference.jsonl"
    summary = run_generate(tiny_model_dir, prompts, reference, GenerationConfig(**GEN_CONFIG), model_name="m0",
                           progress=False)
    assert summary["n_new"] == 16
    return prompts, reference.read_bytes()


def test_generation_killed_twice_resumes_identical(tiny_model_dir, generation_reference, tmp_path):
    rng = random.Random(SEED + 1)
    prompts, ref_bytes = generation_reference
    out, log = tmp_path / "generations.jsonl", tmp_path / "child.log"
    args = [prompts, tiny_model_dir, out, THREADS, GEN_DELAY_S, json.dumps(GEN_CONFIG)]
    for cycle in range(2):
        before = count_lines(out)

        def progressed(before=before):
            return count_lines(out) > before

        kill_after_progress(spawn(GEN_CHILD, args, log), progressed, rng.uniform(0.0, 0.25), log)
        done = complete_lines(out)
        assert ref_bytes.startswith(done), f"cycle {cycle}: the records written so far differ from the reference"
        assert done != ref_bytes, "the kill came too late: nothing left to resume"

    # What a kill in the middle of an append leaves: a torn last line. It is dropped, never parsed.
    done = complete_lines(out)
    next_line = ref_bytes[len(done) :].split(b"\n", 1)[0]
    out.write_bytes(done + next_line[: len(next_line) // 2])

    summary = run_generate(tiny_model_dir, prompts, out, GenerationConfig(**GEN_CONFIG), model_name="m0",
                           progress=False)
    kept = done.count(b"\n")
    print(f"generation: 2 kills, {kept} records kept, {summary['n_new']} generated on resume")
    assert summary["n_existing"] == kept and summary["n_total"] == 16
    assert out.read_bytes() == ref_bytes
    keys = [(r["id"], r["model"], r["sample"]) for r in load_generations(out)]
    assert len(keys) == len(set(keys)) == 16
    record(KILL_CYCLES, 2)


def test_generation_resume_after_a_partly_written_batch_is_identical(tiny_model_dir, generation_reference, tmp_path):
    prompts, ref_bytes = generation_reference
    lines = ref_bytes.splitlines(keepends=True)
    out = tmp_path / "generations.jsonl"
    # batch_size 2: the first two batches whole, then the third batch's first record whole and its second torn
    out.write_bytes(b"".join(lines[:5]) + lines[5][:30])
    run_generate(tiny_model_dir, prompts, out, GenerationConfig(**GEN_CONFIG), model_name="m0", progress=False)
    assert out.read_bytes() == ref_bytes


# ------------------------------------------------------------------------------------------------ judging

N_JUDGED = 90
JUDGE_DELAY_S = 0.02
"""Pause per verdict in the child: at least 0.06 s per chunk of 3."""

JUDGE_CHILD = r"""
import sys, time
from pairtrace.judges.judging import run_judge_generations
from pairtrace.judges.rule import RuleJudge

class SlowJudge(RuleJudge):  # a slow endpoint with the rule judge's answers
    def judge(self, prompt, response):
        time.sleep(float(sys.argv[3]))
        return super().judge(prompt, response)

run_judge_generations(sys.argv[1], SlowJudge(), sys.argv[2], chunk_size=3, progress=False)
"""


def test_judging_killed_three_times_resumes_identical(tmp_path):
    rng = random.Random(SEED + 2)
    responses = ("I'm sorry, but I can't help with that.", "Sure, here is how to do it. Step 1: begin.", "Hmm.")
    records = [
        {"id": f"p{i // 2}", "model": "m1", "sample": i % 2, "prompt": f"request {i // 2}",
         "response": responses[i % 3]}
        for i in range(N_JUDGED)
    ]
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    reference = tmp_path / "reference.jsonl"
    judge_generations(records, RuleJudge(), reference, chunk_size=3, progress=False)
    ref_bytes = reference.read_bytes()

    out, log = tmp_path / "judgements.jsonl", tmp_path / "child.log"
    for cycle in range(3):
        before = count_lines(out)

        def progressed(before=before):
            return count_lines(out) > before

        kill_after_progress(spawn(JUDGE_CHILD, [generations, out, JUDGE_DELAY_S], log), progressed,
                            rng.uniform(0.0, 0.25), log)
        done = complete_lines(out)
        assert ref_bytes.startswith(done), f"cycle {cycle}: the judgements written so far differ from the reference"
        assert done != ref_bytes, "the kill came too late: nothing left to resume"

    kept = count_lines(out)
    summary = judge_generations(records, RuleJudge(), out, chunk_size=3, progress=False)
    print(f"judging: 3 kills, {kept} judgements kept, {summary['judged']} judged on resume")
    assert summary["already_judged"] == kept and summary["judged"] == N_JUDGED - kept
    assert out.read_bytes() == ref_bytes
    assert len(load_judgements(out)) == N_JUDGED
    record(KILL_CYCLES, 3)
