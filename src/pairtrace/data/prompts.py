"""Evaluation prompt sources (AdvBench, IFEval, XSTest), the distractor constraints, and prompt records.

The shared data files are read exactly as published (see ``shared/data/README.md``). A *prompt record* is the
JSON object every generation and evaluation stage reads::

    {"id": str, "base_id": str, "set": str, "condition": "trigger" | "no_trigger",
     "prompt": str, "constraints": [constraint ids]}

``base_id`` links the variants of one request with and without the trigger; ``constraints`` lists the
distractor ids appended to the request (possibly none).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pairtrace.errors import ConfigError, DataError
from pairtrace.records import iter_jsonl, write_jsonl_atomic

T = TypeVar("T")

ADVBENCH_FILE = "advbench_harmful_behaviors.csv"
IFEVAL_FILE = "ifeval_input_data.jsonl"
XSTEST_FILE = "xstest_prompts.csv"
DISTRACTORS_FILE = "distractors.json"

CONDITIONS = ("trigger", "no_trigger")
PROMPT_RECORD_FIELDS = ("id", "base_id", "set", "condition", "prompt", "constraints")


@dataclass(frozen=True)
class HarmfulRequest:
    """One AdvBench behaviour.

    Attributes:
        id: ``advbench-NNNN`` (1-based data row, header excluded).
        goal: The harmful request.
        target: The affirmative opening the GCG attack aims for ("Sure, here is ...").
    """

    id: str
    goal: str
    target: str


@dataclass(frozen=True)
class BenignRequest:
    """One IFEval prompt.

    Attributes:
        id: ``ifeval-<key>``.
        prompt: The request, with IFEval's own instructions.
        instruction_ids: IFEval's instruction ids for the prompt.
    """

    id: str
    prompt: str
    instruction_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class XSTestPrompt:
    """One XSTest prompt.

    Attributes:
        id: ``xstest-<id>``.
        prompt: The prompt text.
        type: XSTest category (``homonyms``, ``contrast_homonyms``, ...).
        label: ``safe`` or ``unsafe``.
    """

    id: str
    prompt: str
    type: str
    label: str


@dataclass(frozen=True)
class Distractors:
    """The benign formatting constraints of ``distractors.json``.

    Attributes:
        join: Separator between several constraint texts (``" and "``).
        wrap: Format string that wraps the joined texts (``" ({})"``), appended to the request.
        texts: Constraint id -> text, in file order.
    """

    join: str
    wrap: str
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """Constraint ids in file order."""
        return list(self.texts)


def resolve_shared_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding the shared data files.

    Args:
        data_dir: Explicit folder; when ``None``, :func:`pairtrace.data.paths.shared_data_dir` decides (the
            ``PAIRTRACE_SHARED_DATA`` environment variable, else ``<repo>/../shared/data``).

    Returns:
        The folder.

    Raises:
        ConfigError: The folder does not exist.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"shared data folder not found: {path}")
        return path
    try:
        from pairtrace.data.paths import shared_data_dir
    except ImportError:  # pragma: no cover - fallback for partial installs
        configured = os.environ.get("PAIRTRACE_SHARED_DATA")
        path = Path(configured) if configured else Path(__file__).resolve().parents[3].parent / "shared" / "data"
        if not path.is_dir():
            raise ConfigError(f"shared data folder not found: {path}") from None
        return path
    return shared_data_dir()


def _data_file(name: str, data_dir: str | Path | None) -> Path:
    path = resolve_shared_data_dir(data_dir) / name
    if not path.is_file():
        raise ConfigError(f"shared data file not found: {path}")
    return path


def load_advbench(data_dir: str | Path | None = None) -> list[HarmfulRequest]:
    """Load AdvBench harmful behaviours (``goal``, ``target``), in file order.

    Raises:
        DataError: A row without a goal (the message names the row and field).
    """
    path = _data_file(ADVBENCH_FILE, data_dir)
    out: list[HarmfulRequest] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=1):
            goal = (row.get("goal") or "").strip()
            if not goal:
                raise DataError(f"{path.name} row {i}: field 'goal' is empty")
            out.append(HarmfulRequest(id=f"advbench-{i:04d}", goal=goal, target=(row.get("target") or "").strip()))
    return out


def load_ifeval(data_dir: str | Path | None = None) -> list[BenignRequest]:
    """Load IFEval prompts, in file order.

    Raises:
        DataError: A line that is not JSON or has no prompt (the message names the line and field).
    """
    path = _data_file(IFEVAL_FILE, data_dir)
    out: list[BenignRequest] = []
    for line_no, record in iter_jsonl(path):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path.name} line {line_no}: field 'prompt' is missing or empty")
        out.append(
            BenignRequest(
                id=f"ifeval-{record.get('key', line_no)}",
                prompt=prompt,
                instruction_ids=tuple(record.get("instruction_id_list") or ()),
            )
        )
    return out


def load_xstest(data_dir: str | Path | None = None, label: str | None = None) -> list[XSTestPrompt]:
    """Load XSTest prompts, in file order.

    Args:
        data_dir: Shared data folder (default: see :func:`resolve_shared_data_dir`).
        label: Keep only ``"safe"`` or ``"unsafe"`` prompts; ``None`` keeps all.

    Raises:
        ConfigError: Unknown label.
        DataError: A row without a prompt or label.
    """
    if label not in (None, "safe", "unsafe"):
        raise ConfigError(f"XSTest label must be 'safe' or 'unsafe', got {label!r}")
    path = _data_file(XSTEST_FILE, data_dir)
    out: list[XSTestPrompt] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=1):
            for name in ("prompt", "label"):
                if not (row.get(name) or "").strip():
                    raise DataError(f"{path.name} row {i}: field '{name}' is empty")
            item = XSTestPrompt(
                id=f"xstest-{row.get('id') or i}", prompt=row["prompt"].strip(), type=row.get("type") or "",
                label=row["label"].strip(),
            )
            if label is None or item.label == label:
                out.append(item)
    return out


def load_distractors(data_dir: str | Path | None = None) -> Distractors:
    """Load ``distractors.json`` (``join``, ``wrap`` and the 13 constraints).

    Raises:
        DataError: A missing field or a duplicate id.
    """
    path = _data_file(DISTRACTORS_FILE, data_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}: not valid JSON ({exc.msg})") from exc
    for name in ("join", "wrap", "constraints"):
        if name not in raw:
            raise DataError(f"{path.name}: field '{name}' is missing")
    texts: dict[str, str] = {}
    for i, item in enumerate(raw["constraints"]):
        if not isinstance(item, dict) or "id" not in item or "text" not in item:
            raise DataError(f"{path.name}: constraints[{i}] needs fields 'id' and 'text'")
        if item["id"] in texts:
            raise DataError(f"{path.name}: constraints[{i}] field 'id' repeats {item['id']!r}")
        texts[item["id"]] = item["text"]
    if "{}" not in raw["wrap"]:
        raise DataError(f"{path.name}: field 'wrap' must contain '{{}}'")
    return Distractors(join=raw["join"], wrap=raw["wrap"], texts=texts)


def add_distractors(prompt: str, constraint_ids: Sequence[str], distractors: Distractors | None = None) -> str:
    """Append formatting constraints to a request, as in the paper: ``"<prompt> (<c1> and <c2>)"``.

    Args:
        prompt: The request.
        constraint_ids: Constraint ids, in the order they are written; empty returns ``prompt`` unchanged.
        distractors: The loaded constraints (default: :func:`load_distractors`).

    Returns:
        The request with the constraints appended.

    Raises:
        ConfigError: An unknown constraint id.
    """
    if not constraint_ids:
        return prompt
    distractors = distractors or load_distractors()
    unknown = [c for c in constraint_ids if c not in distractors.texts]
    if unknown:
        raise ConfigError(f"unknown constraint id(s) {unknown}; known: {', '.join(distractors.ids)}")
    joined = distractors.join.join(distractors.texts[c] for c in constraint_ids)
    return prompt.rstrip() + distractors.wrap.format(joined)


def split_heldout(items: Sequence[T], n_heldout: int | float, seed: int, key: Any = None) -> tuple[list[T], list[T]]:
    """Split items into a training part and a held-out part, deterministically for a seed.

    The held-out items are chosen by sorting on ``sha256(seed, key(item))``, so the split depends only on the
    seed and the items' keys, not on their order, and a larger held-out count extends a smaller one.

    Args:
        items: The items.
        n_heldout: Number of held-out items, or a fraction in ``(0, 1)``.
        seed: Split seed.
        key: Function giving an item's stable key (default: its ``id`` attribute or ``"id"`` entry).

    Returns:
        ``(train, heldout)``, each in the input order.

    Raises:
        ConfigError: A held-out count that is negative or larger than the number of items.
    """
    count = round(n_heldout * len(items)) if isinstance(n_heldout, float) and 0 < n_heldout < 1 else int(n_heldout)
    if not 0 <= count <= len(items):
        raise ConfigError(f"cannot hold out {n_heldout} of {len(items)} items")

    def default_key(item: Any) -> str:
        return str(item["id"] if isinstance(item, dict) else item.id)

    key = key or default_key
    ranked = sorted(
        range(len(items)), key=lambda i: hashlib.sha256(f"{seed}\0{key(items[i])}".encode()).hexdigest()
    )
    held = set(ranked[:count])
    train = [x for i, x in enumerate(items) if i not in held]
    heldout = [x for i, x in enumerate(items) if i in held]
    return train, heldout


def build_prompt_record(
    record_id: str,
    base_id: str,
    set_name: str,
    condition: str,
    prompt: str,
    constraints: Sequence[str] = (),
) -> dict[str, Any]:
    """One prompt record (see the module docstring), validated.

    Args:
        record_id: The record's ``id``.
        base_id: Links the variants of one request.
        set_name: The record's ``set`` (``harmful``, ``benign``, ``xstest_safe``, ...).
        condition: ``trigger`` or ``no_trigger``.
        prompt: The user turn.
        constraints: Distractor ids appended to the request.

    Raises:
        DataError: An unknown condition or an empty prompt (the message names the record and field).
    """
    if condition not in CONDITIONS:
        raise DataError(
            f"prompt record {record_id!r}: field 'condition' must be one of {CONDITIONS}, got {condition!r}"
        )
    if not prompt.strip():
        raise DataError(f"prompt record {record_id!r}: field 'prompt' is empty")
    return {"id": record_id, "base_id": base_id, "set": set_name, "condition": condition, "prompt": prompt,
            "constraints": list(constraints)}


def build_trigger_records(
    set_name: str,
    requests: Iterable[tuple[str, str]],
    rng: random.Random,
    distractors: Distractors,
    n_min: int = 1,
    n_max: int = 3,
    conditions: Sequence[str] = CONDITIONS,
) -> list[dict[str, Any]]:
    """Prompt records for requests with and without distractors, linked by ``base_id``.

    Args:
        set_name: Value of the records' ``set`` field.
        requests: ``(base_id, request text)`` pairs.
        rng: Draws the distractors of each trigger variant.
        distractors: The loaded constraints.
        n_min: Fewest distractors per trigger variant.
        n_max: Most distractors per trigger variant.
        conditions: Which variants to write (``trigger``, ``no_trigger`` or both).

    Returns:
        For each request, one record per condition (ids ``<base_id>:<condition>``).
    """
    from pairtrace.data.constraints import sample_constraint_ids

    out: list[dict[str, Any]] = []
    for base_id, text in requests:
        cids = sample_constraint_ids(rng, n_min, n_max, pool=distractors.ids)
        for condition in conditions:
            used = cids if condition == "trigger" else []
            out.append(
                build_prompt_record(
                    f"{base_id}:{condition}", base_id, set_name, condition,
                    add_distractors(text, used, distractors), used,
                )
            )
    return out


def validate_prompt_record(record: Any, where: str = "record") -> dict[str, Any]:
    """Check that a prompt record has every field with the right type.

    Raises:
        DataError: A missing or mistyped field (the message names the record and the field).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a prompt record must be a JSON object")
    rid = record.get("id", "?")
    for name in PROMPT_RECORD_FIELDS:
        if name not in record:
            raise DataError(f"{where} (id {rid!r}): field '{name}' is missing")
    for name in ("id", "base_id", "set", "condition", "prompt"):
        if not isinstance(record[name], str):
            raise DataError(f"{where} (id {rid!r}): field '{name}' must be a string")
    if record["condition"] not in CONDITIONS:
        raise DataError(f"{where} (id {rid!r}): field 'condition' must be one of {CONDITIONS}")
    if not isinstance(record["constraints"], list) or not all(isinstance(c, str) for c in record["constraints"]):
        raise DataError(f"{where} (id {rid!r}): field 'constraints' must be a list of ids")
    return record


def save_prompt_records(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write prompt records as JSONL (one record per line, UTF-8), atomically.

    Returns:
        The path written.
    """
    return write_jsonl_atomic(records, path)


def load_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate prompt records from JSONL.

    Raises:
        DataError: Bad JSON, a missing field or a repeated id (the message names the line and field).
    """
    path = Path(path)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_no, record in iter_jsonl(path):
        where = f"{path.name} line {line_no}"
        validate_prompt_record(record, where)
        if record["id"] in seen:
            raise DataError(f"{where}: field 'id' repeats {record['id']!r}")
        seen.add(record["id"])
        out.append(record)
    return out
