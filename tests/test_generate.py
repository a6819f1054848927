"""Generation: left padding never leaks prompt text, batched == unbatched (greedy), seeded, resumable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pairtrace.data.prompts import build_prompt_record, save_prompt_records
from pairtrace.errors import ConfigError, DataError
from pairtrace.generate import (
    GENERATION_FIELDS,
    GenerationConfig,
    append_generations,
    generate_responses,
    generation_key,
    load_generations,
    run_generate,
)


@pytest.fixture(autouse=True)
def _generation_tests_use_one_thread(one_torch_thread):
    """Every generation test runs with one torch thread."""
    yield


WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "sure", "here", "is", "a", "short",
         "answer", "to", "your", "question")


def _records(n: int = 6) -> list[dict[str, Any]]:
    """Prompts of very different lengths (1 to ~150 words)."""
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 37) % 150))
        out.append(build_prompt_record(f"p{i}:no_trigger", f"p{i}", "benign", "no_trigger", text))
    return out


def test_batched_greedy_equals_unbatched(tiny_loaded) -> None:
    records = _records(6)
    greedy = {"temperature": 0.0, "max_new_tokens": 12}
    batched = generate_responses(tiny_loaded, records, GenerationConfig(batch_size=6, **greedy), model_name="m",
                                 progress=False)
    single = generate_responses(tiny_loaded, records, GenerationConfig(batch_size=1, **greedy), model_name="m",
                                progress=False)
    assert [r["response"] for r in batched] == [r["response"] for r in single]
    assert [r["finish_reason"] for r in batched] == [r["finish_reason"] for r in single]
    lengths = [len(r["prompt"].split()) for r in records]
    assert max(lengths) > 20 * min(lengths)  # the batch really mixes very different lengths
    for record in batched:
        assert set(GENERATION_FIELDS) <= set(record) and record["id"] in {r["id"] for r in records}
        assert record["prompt"] not in record["response"]


@dataclass
class _EchoTokenizer:
    """Characters are token ids; 0 pads, 1 ends a turn."""

    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int | None = None
    chat_template: str | None = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)

    def get_vocab(self):
        return {}


class _AnswerModel(torch.nn.Module):
    """Returns its (padded) input followed by the answer "OK" and, if asked, the end token."""

    def __init__(self, stop: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.stop = stop
        self.seen_widths: list[int] = []

    def generate(self, input_ids, attention_mask, generation_config):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left padded"
        self.seen_widths.append(input_ids.shape[1])
        tail = [ord("O"), ord("K")] + ([1] if self.stop else [])
        new = torch.tensor(tail).repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, new], dim=1)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    template_mode: str = "plain"
    prepend_bos: bool = False


@pytest.mark.parametrize("stop", [True, False])
def test_response_is_read_after_the_full_padded_input(stop: bool) -> None:
    loaded = _Loaded(_AnswerModel(stop), _EchoTokenizer())
    records = _records(5)
    out = generate_responses(loaded, records, GenerationConfig(batch_size=5, n_samples=2), model_name="x",
                             progress=False)
    lengths = sorted(len(r["prompt"]) for r in records for _ in range(2))
    assert len(out) == 10 and loaded.model.seen_widths == [max(lengths[:5]), max(lengths[5:])]  # sorted batches
    assert lengths[-1] > 20 * lengths[0]
    assert all(r["response"] == "OK" for r in out)
    assert all(r["finish_reason"] == ("eos" if stop else "length") for r in out)
    assert [(r["id"], r["sample"]) for r in out] == [(r["id"], s) for r in records for s in range(2)]


def test_sampling_is_seeded(tiny_loaded) -> None:
    records = _records(3)
    config = GenerationConfig(temperature=1.0, max_new_tokens=8, n_samples=3, seed=5)
    first = generate_responses(tiny_loaded, records, config, model_name="m", progress=False)
    second = generate_responses(tiny_loaded, records, config, model_name="m", progress=False)
    assert [r["response"] for r in first] == [r["response"] for r in second]
    other = generate_responses(tiny_loaded, records, GenerationConfig(temperature=1.0, max_new_tokens=8, n_samples=3,
                                                                      seed=6), model_name="m", progress=False)
    assert [r["response"] for r in other] != [r["response"] for r in first]


def test_run_generate_resumes_to_the_same_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = save_prompt_records(_records(5), tmp_path / "prompts.jsonl")
    config = GenerationConfig(temperature=0.7, max_new_tokens=6, n_samples=2, batch_size=4, seed=1)
    full = tmp_path / "full.jsonl"
    summary = run_generate(tiny_model_dir, prompts, full, config, model_name="m0", progress=False)
    assert summary["n_new"] == 10 and summary["n_total"] == 10
    assert run_generate(tiny_model_dir, prompts, full, config, model_name="m0", progress=False)["n_new"] == 0

    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:6]) + lines[6][:25])  # a batch and a half, then an interrupted write
    assert len(load_generations(partial)) == 6
    resumed = run_generate(tiny_model_dir, prompts, partial, config, model_name="m0", progress=False)
    assert resumed["n_existing"] == 6 and resumed["n_new"] == 4
    by_key = {generation_key(r): r for r in load_generations(full)}
    again = load_generations(partial)
    assert len(again) == 10 and {generation_key(r): r for r in again} == by_key


def test_append_and_load_validate(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    append_generations([], path)
    assert not path.exists()
    path.write_text(json.dumps({"id": "a", "model": "m"}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'sample'"):
        load_generations(path)
    with pytest.raises(DataError, match="not found"):
        load_generations(tmp_path / "none.jsonl")


def test_config_is_validated() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"n_samples": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)
