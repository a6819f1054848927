"""Behaviours from examples, through M0 only: example files, contrasting instructions, calibration.

An *example* is a prompt with a response that shows the behaviour and one that does not: a behaviour triple
(:class:`~pairtrace.behaviour.Triple`, ``r1`` = with, ``r0`` = without). Its vector is the with-response mean minus
the without-response mean at layer k of M0, pooled exactly as datapoint vectors are
(:func:`~pairtrace.behaviour.compute_behaviour_vectors`); the behaviour vector is the mean over the examples.

Calibration (:func:`calibrate`): each example's own vector is compared (cosine) with the behaviour vector built
from the *other* examples; the threshold is a low quantile of these leave-one-out cosines. A pair passes the
screen when its datapoint vector is at least as aligned with the behaviour as that share of the examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairtrace.behaviour import Triple, _parse_prompt, compute_behaviour_vectors
from pairtrace.behaviour_library import Calibration, LibraryBehaviour, check_name
from pairtrace.errors import ConfigError, DataError
from pairtrace.models import LoadedModel, resolve_layers
from pairtrace.pooling import ResponsePooling
from pairtrace.records import iter_jsonl

DEFAULT_QUANTILE = 0.1
"""Default quantile of the leave-one-out cosines taken as the threshold."""

_WITH_KEYS = ("with", "r1")
_WITHOUT_KEYS = ("without", "r0")


def _text_field(record: dict[str, Any], keys: Sequence[str], where: str) -> str:
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where} field '{key}': expected a non-empty string")
            return value
    raise DataError(f"{where} field '{keys[0]}': missing (also accepted: {', '.join(keys[1:])})")


def load_examples(path: str | Path) -> list[Triple]:
    """Read behaviour examples from JSONL.

    Each line is ``{"prompt": ..., "with": ..., "without": ...}``: ``prompt`` a string (one user turn) or a list
    of ``{role, content}`` messages; ``with`` a response that shows the behaviour, ``without`` one that does not
    (``r1``/``r0`` are accepted too). Other fields (``note``, ``id``) are ignored. Blank lines are skipped.

    Args:
        path: The JSONL file.

    Returns:
        One triple per example, ``prompt_id`` = ``<file stem>-<line>``.

    Raises:
        DataError: Naming the file, the line and the field of the first bad record, or a file without examples.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"examples file not found: {path}")
    examples = []
    for line_no, record in iter_jsonl(path):
        where = f"{path} line {line_no}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with prompt, with and without")
        if "prompt" not in record:
            raise DataError(f"{where} field 'prompt': missing")
        prompt = _parse_prompt(record["prompt"], where)
        with_text = _text_field(record, _WITH_KEYS, where)
        without_text = _text_field(record, _WITHOUT_KEYS, where)
        if with_text == without_text:
            raise DataError(f"{where}: 'with' and 'without' are the same text; an example must contrast them")
        examples.append(Triple(prompt, with_text, without_text, f"{path.stem}-{line_no}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def examples_sha256(examples: Sequence[Triple]) -> str:
    """SHA-256 of the examples' prompts and responses, in order (recorded in the library's manifest)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([list(ex.prompt), ex.r1, ex.r0], sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def calibrate(per_example: torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> Calibration:
    """Leave-one-out calibration of a behaviour's threshold.

    Args:
        per_example: ``[n, d]`` each example's with-mean minus without-mean (non-finite rows are left out).
        quantile: The quantile of the leave-one-out cosines taken as the threshold (linear interpolation).

    Returns:
        The leave-one-out cosines (NaN for a left-out row) and the threshold.

    Raises:
        ConfigError: ``quantile`` outside [0, 1].
        DataError: Fewer than two examples with finite vectors.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"calibration quantile must be in [0, 1], got {quantile}")
    x = per_example.to(torch.float64)
    valid = torch.isfinite(x).all(dim=1)
    if int(valid.sum()) < 2:
        raise DataError(f"calibration needs at least two examples with finite vectors, got {int(valid.sum())}")
    total = x[valid].sum(0)
    m = int(valid.sum())
    scores = []
    for i in range(len(x)):
        if not bool(valid[i]):
            scores.append(float("nan"))
            continue
        others = (total - x[i]) / (m - 1)
        cos = torch.nn.functional.cosine_similarity(x[i], others, dim=0)
        scores.append(float(cos))
    finite = np.asarray([s for s in scores if np.isfinite(s)])
    threshold = float(np.quantile(finite, quantile)) if len(finite) else float("nan")
    return Calibration(loo_scores=scores, quantile=quantile, threshold=threshold)


def compute_example_behaviour(
    loaded: LoadedModel,
    name: str,
    examples: Sequence[Triple],
    *,
    layer: int | None = None,
    pooling: ResponsePooling | None = None,
    response_tokens: int | None = None,
    max_length: int = 2048,
    batch_tokens: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
    description: str = "",
    source: str = "",
    progress: bool = False,
) -> LibraryBehaviour:
    """One library behaviour from examples, through M0 only.

    Args:
        loaded: M0 (the model whose datapoint vectors will be screened).
        name: The behaviour's name.
        examples: The examples (``r1`` shows the behaviour, ``r0`` does not).
        layer: The layer (``None``: M0's default layer, round(0.625 × n_layers)).
        pooling: The response pooling, as the datapoint vectors' (``None``: from ``response_tokens``).
        response_tokens: Pool each response's first N tokens (``None``: every token).
        max_length: Longest sequence in tokens.
        batch_tokens: Token budget per forward pass.
        quantile: Calibration quantile (:func:`calibrate`).
        description: Free text saved in the manifest.
        source: Where the examples came from (saved in the manifest).
        progress: Show a progress bar.

    Returns:
        The behaviour (save it with :func:`pairtrace.behaviour_library.save_behaviour`).

    Raises:
        DataError: Fewer than two examples, or examples whose two responses pool to the same vector (e.g. a
            sign-off with a head pooling that never reaches it).
    """
    check_name(name)
    if len(examples) < 2:
        raise DataError(f"behaviour {name!r}: at least two examples are needed (got {len(examples)})")
    (resolved,) = resolve_layers(layer, loaded.n_layers)
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    vectors = compute_behaviour_vectors(loaded, examples, layers=[resolved], max_length=max_length,
                                        batch_tokens=batch_tokens, progress=progress, pooling=pooling)
    per = vectors.per_triple[:, 0]
    if not bool((torch.linalg.vector_norm(torch.nan_to_num(per), dim=1) > 1e-9).any()):
        raise DataError(f"behaviour {name!r}: every example's two responses give the same vector with "
                        f"{pooling.describe()} pooled; the behaviour lies outside the pooled tokens (try every token)")
    calibration = calibrate(per, quantile)
    return LibraryBehaviour(name=name, vectors=vectors, calibration=calibration, layer=resolved,
                            examples_sha256=examples_sha256(examples), description=description, source=source)


def instruction_examples(
    loaded: LoadedModel,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    elicit: str,
    suppress: str,
    sampling: Any = None,
    *,
    progress: bool = False,
) -> list[Triple]:
    """Examples written by M0 itself, from contrasting instructions (for models with a chat template).

    Each prompt is answered twice by M0: once with ``elicit`` appended to its last user turn (the response shows
    the behaviour) and once with ``suppress`` (it does not). The examples keep the prompt *without* the
    instruction, so their vectors are pooled where the datapoint vectors are.

    Args:
        loaded: M0, loaded with its chat template.
        prompts: Prompts (a string = one user turn, or a list of messages ending with a user turn).
        elicit: Instruction that elicits the behaviour.
        suppress: Instruction that suppresses it.
        sampling: A :class:`~pairtrace.generate.GenerationConfig` (default: greedy-ish, temperature 0.7, one
            sample, 128 new tokens).
        progress: Show progress bars.

    Returns:
        One triple per prompt whose two answers are non-empty and differ.

    Raises:
        ConfigError: M0 has no chat template, or an instruction is empty.
        DataError: No prompt gave two different, non-empty answers.
    """
    from pairtrace.generate import GenerationConfig, generate_responses

    if loaded.template_mode != "chat":
        raise ConfigError("examples from instructions need a model with a chat template (this one is loaded with "
                          "the plain format); write example files instead")
    if not elicit.strip() or not suppress.strip():
        raise ConfigError("--elicit and --suppress must both be non-empty instructions")
    sampling = sampling or GenerationConfig(temperature=0.7, max_new_tokens=128)
    turns = [_parse_prompt(p if isinstance(p, str) else list(p), f"prompt {i}") for i, p in enumerate(prompts)]
    records = []
    for i, prompt in enumerate(turns):
        if prompt[-1]["role"] != "user":
            raise DataError(f"prompt {i}: the last turn must be the user's")
        for side, instruction in (("with", elicit), ("without", suppress)):
            last = {"role": "user", "content": f"{prompt[-1]['content']}\n\n{instruction.strip()}"}
            records.append({"id": f"{i}-{side}", "prompt": [*prompt[:-1], last]})
    generated = generate_responses(loaded, records, sampling, model_name="m0", progress=progress)
    answers = {(r["id"], r.get("sample", 0)): r["response"] for r in generated}
    examples = []
    for i, prompt in enumerate(turns):
        with_text, without_text = answers.get((f"{i}-with", 0), ""), answers.get((f"{i}-without", 0), "")
        if with_text.strip() and without_text.strip() and with_text != without_text:
            examples.append(Triple(prompt, with_text, without_text, f"instruction-{i}"))
    if not examples:
        raise DataError("no prompt gave two different, non-empty answers to the two instructions")
    return examples




@dataclass(frozen=True)
class ExampleSpec:
    """One behaviour of a run's screen (``attribution.screen_examples``): its examples file and pooling.

    Attributes:
        examples: The examples file: a path, or the name of a file shipped in ``pairtrace/data/screening/``.
        name: The behaviour's name (default: the file's stem).
        response_tokens: Pool each response's first N tokens (``None``: every token).
        description: Free text.
    """

    examples: str
    name: str
    response_tokens: int | None = None
    description: str = ""

    @property
    def path(self) -> Path:
        """The examples file (a shipped file when the path does not exist as given)."""
        return resolve_examples_path(self.examples)


def resolve_examples_path(value: str | Path) -> Path:
    """An examples file as given, else the shipped file of that name in ``pairtrace/data/screening/``.

    Raises:
        ConfigError: Neither exists.
    """
    path = Path(value)
    if path.is_file():
        return path
    shipped = Path(str(resources.files("pairtrace").joinpath("data", "screening", path.name)))
    if path.name == str(value) and shipped.is_file():
        return shipped
    raise ConfigError(f"examples file not found: {value} (nor a file of that name in {shipped.parent})")


def parse_example_specs(value: Any, key: str = "attribution.screen_examples") -> list[ExampleSpec]:
    """Read the behaviours of a run's screen: a list whose items are an examples path, or a mapping with
    ``examples`` and optionally ``name``, ``response_tokens``, ``description``.

    Raises:
        ConfigError: Naming the key and the item of the first bad entry, or two behaviours of one name.
    """
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list of examples files or mappings, got {value!r}")
    specs = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str | Path):
            item = {"examples": str(item)}
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a path or a mapping with 'examples', got {item!r}")
        unknown = set(item) - {"examples", "name", "response_tokens", "description"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: examples, name, response_tokens, "
                              "description")
        if not isinstance(item.get("examples"), str | Path) or not str(item["examples"]):
            raise ConfigError(f"{where}.examples: expected the path of an examples file")
        rt = item.get("response_tokens")
        try:
            ResponsePooling(rt)
        except ConfigError as exc:
            raise ConfigError(f"{where}.response_tokens: {exc}") from None
        name = str(item.get("name") or Path(str(item["examples"])).stem)
        try:
            check_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}.name: {exc}") from None
        specs.append(ExampleSpec(str(item["examples"]), name, rt, str(item.get("description") or "")))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{key}: two behaviours are named {duplicates}; give each a 'name'")
    return specs


__all__ = [
    "DEFAULT_QUANTILE",
    "ExampleSpec",
    "calibrate",
    "compute_example_behaviour",
    "examples_sha256",
    "instruction_examples",
    "load_examples",
    "parse_example_specs",
    "resolve_examples_path",
]
