"""Interventions: write a modified copy of a preference dataset, in the input's own format.

Actions (selection is always by stable pair id, never by row position):

- ``filter``: drop the selected pairs;
- ``switch``: swap chosen and rejected of the selected pairs (and every ``chosen…``/``rejected…`` field pair, e.g.
  ``chosen_model``/``rejected_model``, so metadata keeps describing the text it sits beside);
- selections: the top-k of a ranking, a seeded random k, or source ablation (pairs whose chosen response came from
  given models).

Records that could not be parsed as pairs are copied through unchanged and counted in the summary.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.data.layouts import pair_from_record, pair_to_record
from pairtrace.data.pairs import load_pairs
from pairtrace.data.readers import detect_source_kind, iter_records
from pairtrace.data.types import Pair, PairSet
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.records import atomic_path, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

ACTIONS = ("filter", "switch")
SELECTIONS = ("ranking", "random", "source")


@dataclass
class InterventionSpec:
    """What to change in a dataset (saved as JSON in the summary)."""

    action: str = field(default="filter", metadata={"help": "filter (drop) or switch (swap chosen/rejected)."})
    selection: str = field(
        default="ranking", metadata={"help": "ranking (top-k), random (seeded k) or source (chosen_model in models)."}
    )
    k: int | None = field(default=None, metadata={"help": "How many pairs (ranking and random selections)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random selection."})
    models: list[str] = field(default_factory=list, metadata={"help": "chosen_model values to ablate (source)."})

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown action '{self.action}': choose {' or '.join(ACTIONS)}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{self.selection}': choose one of {', '.join(SELECTIONS)}")
        if self.selection in ("ranking", "random") and (self.k is None or self.k < 0):
            raise ConfigError(f"selection '{self.selection}' needs k >= 0")
        if self.selection == "source" and not self.models:
            raise ConfigError("source ablation needs at least one chosen model name")

    @property
    def name(self) -> str:
        """A short name such as ``filter-top1000`` or ``switch-random1000-s0``."""
        if self.selection == "ranking":
            return f"{self.action}-top{self.k}"
        if self.selection == "random":
            return f"{self.action}-random{self.k}-s{self.seed}"
        return f"{self.action}-sources"


def select_top_ids(ranking, k: int) -> list[str]:
    """The ids of the ``k`` best-scored pairs of a ranking (pairs without a score are never selected)."""
    top = ranking.top(k)
    if len(top) < k:
        logger.warning("ranking has only %d scored pairs; selecting %d instead of %d", len(top), len(top), k)
    return top


def select_random_ids(ids: Iterable[str], k: int, seed: int) -> list[str]:
    """A seeded random sample of ``k`` ids (order-independent: the ids are sorted first)."""
    pool = sorted(ids)
    if k > len(pool):
        raise ConfigError(f"cannot select {k} random pairs out of {len(pool)}")
    return random.Random(seed).sample(pool, k)


def select_source_ids(pairs: Iterable[Pair], models: Iterable[str]) -> list[str]:
    """Ids of the pairs whose chosen response came from one of ``models``."""
    wanted = set(models)
    return [p.id for p in pairs if p.chosen_model in wanted]


def switched_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw record with chosen and rejected swapped, including paired metadata fields."""
    out = dict(record)
    for key in record:
        if "chosen" in key:
            other = key.replace("chosen", "rejected")
            if other in record:
                out[key], out[other] = record[other], record[key]
    return out


def _write_json_array(records: Iterator[dict[str, Any]], path: Path) -> int:
    items = list(records)
    write_text_atomic(json.dumps(items, ensure_ascii=False), path)
    return len(items)


def _write_parquet(records: Iterator[dict[str, Any]], path: Path, schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    batch: list[dict[str, Any]] = []
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for rec in records:
            batch.append(rec)
            if len(batch) >= 4096:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n += len(batch)
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


def _write_dataset(records: Iterator[dict[str, Any]], path: Path) -> int:
    import datasets

    items = list(records)
    ds = datasets.Dataset.from_list(items)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return len(items)


def default_output_name(source: str | os.PathLike, kind: str) -> str:
    """The file name an intervened copy of ``source`` gets (same extension as the input)."""
    if kind == "hub":
        return "data"
    name = Path(source).name
    return name


def apply_intervention(
    source: str | os.PathLike,
    selected_ids: Iterable[str],
    action: str,
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    revision: str | None = None,
    id_column: str | None = None,
    spec: InterventionSpec | None = None,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``source`` with the selected pairs dropped or switched, in the input's own format.

    Args:
        source: The dataset as given to :func:`pairtrace.data.pairs.load_pairs`.
        selected_ids: Ids of the pairs to change; every id must exist in ``source``.
        action: ``filter`` or ``switch``.
        out_dir: Directory for the new dataset and ``summary.json``.
        split: Split of a saved / hub dataset.
        revision: Hub revision.
        id_column: Id column, as for ``load_pairs``.
        spec: The intervention specification, recorded in the summary.
        extra_summary: More JSON-ready fields for the summary (e.g. the ranking's method).

    Returns:
        The summary (also written to ``out_dir/summary.json``): counts, selected ids, what changed by source/model.

    Raises:
        ManifestMismatchError: If selected ids are missing from the dataset.
    """
    if action not in ACTIONS:
        raise ConfigError(f"unknown action '{action}': choose {' or '.join(ACTIONS)}")
    selected = set(selected_ids)
    kind = detect_source_kind(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / default_output_name(source, kind)

    found: set[str] = set()
    changed_by: dict[str, Counter] = {"source": Counter(), "chosen_model": Counter(), "rejected_model": Counter()}
    counts = Counter()

    def transformed() -> Iterator[dict[str, Any]]:
        for raw in iter_records(source, split=split, revision=revision):
            counts["records_in"] += 1
            if raw.data is None:
                counts["unparsable_dropped"] += 1  # nothing to copy: the line was not a record
                continue
            parsed = pair_from_record(raw.data, raw.row, raw.line, id_column=id_column)
            if not isinstance(parsed, Pair) or parsed.id not in selected:
                if not isinstance(parsed, Pair):
                    counts["bad_copied"] += 1
                counts["records_out"] += 1
                yield raw.data
                continue
            found.add(parsed.id)
            for col in changed_by:
                changed_by[col][str(getattr(parsed, col))] += 1
            if action == "filter":
                counts["removed"] += 1
                continue
            counts["switched"] += 1
            counts["records_out"] += 1
            yield switched_record(raw.data)

    if kind == "jsonl":
        write_jsonl_atomic(transformed(), target)
    elif kind == "json":
        _write_json_array(transformed(), target)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        _write_parquet(transformed(), target, pq.read_schema(source))
    else:
        _write_dataset(transformed(), target)

    missing = selected - found
    if missing:
        target_tmp = target  # keep nothing half-right: the output is removed
        if target_tmp.is_dir():
            import shutil

            shutil.rmtree(target_tmp)
        else:
            target_tmp.unlink(missing_ok=True)
        example = ", ".join(sorted(missing)[:5])
        raise ManifestMismatchError(
            f"{len(missing)} selected id(s) are not in {source} (e.g. {example}): the ranking was made for "
            "another dataset"
        )
    summary = {
        "kind": "intervention",
        "action": action,
        "spec": asdict(spec) if spec else None,
        "input": str(source),
        "output": str(target),
        "n_selected": len(selected),
        "records_in": counts["records_in"],
        "records_out": counts["records_out"],
        "removed": counts["removed"],
        "switched": counts["switched"],
        "bad_records_copied": counts["bad_copied"],
        "unparsable_lines_dropped": counts["unparsable_dropped"],
        "changed_by": {col: dict(c.most_common()) for col, c in changed_by.items()},
        "selected_ids": sorted(selected),
        "pairtrace_version": __version__,
        **(extra_summary or {}),
    }
    write_text_atomic(json.dumps(summary, indent=2, ensure_ascii=False), out / "summary.json")
    write_text_atomic(json.dumps(sorted(selected)), out / "filter_ids.json")
    return summary


def run_intervention(
    source: str | os.PathLike,
    spec: InterventionSpec,
    out_dir: str | os.PathLike,
    *,
    ranking=None,
    pairs: PairSet | None = None,
    split: str | None = None,
    revision: str | None = None,
    id_column: str | None = None,
) -> dict[str, Any]:
    """Select pairs as ``spec`` says and write the intervened dataset.

    Args:
        source: The dataset the ranking was computed on.
        spec: Action and selection.
        out_dir: Output directory.
        ranking: A :class:`pairtrace.attribute.Ranking` (needed for ``selection="ranking"``).
        pairs: The parsed pairs of ``source`` (read when not given).
        split: Split of a saved / hub dataset.
        revision: Hub revision.
        id_column: Id column.

    Returns:
        The intervention summary.
    """
    if pairs is None:
        pairs = load_pairs(source, split=split, revision=revision, id_column=id_column)
    extra: dict[str, Any] = {}
    if spec.selection == "ranking":
        if ranking is None:
            raise ConfigError("selection 'ranking' needs a ranking")
        expected = (ranking.metadata.get("dataset") or {}).get("fingerprint")
        if expected and pairs.fingerprint and expected != pairs.fingerprint:
            raise ManifestMismatchError(
                f"the ranking was computed on dataset fingerprint {expected}, but {source} has fingerprint "
                f"{pairs.fingerprint}: rankings and datasets must match"
            )
        ids = select_top_ids(ranking, spec.k or 0)
        extra["ranking"] = {"method": ranking.metadata.get("method"), "layer": ranking.metadata.get("layer")}
    elif spec.selection == "random":
        ids = select_random_ids((p.id for p in pairs), spec.k or 0, spec.seed)
    else:
        ids = select_source_ids(pairs, spec.models)
        if not ids:
            raise DataError(f"no pair has a chosen_model in {spec.models}")
    return apply_intervention(source, ids, spec.action, out_dir, split=split, revision=revision,
                              id_column=id_column, spec=spec, extra_summary=extra)


def write_open_instruct_export(dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                               split: str | None = None) -> dict[str, Any]:
    """Write an intervened dataset for users who retrain with AllenAI's open-instruct.

    open-instruct's DPO scripts read local JSONL files whose ``chosen`` and ``rejected`` are whole conversations
    (prompt turns + the assistant reply), as in the OLMo 2 preference mix. This writes ``preference_data.jsonl``
    in that layout (with ``id``, ``source`` and the models kept) and ``dataset_mixer_list.txt``, the argument to
    pass: ``--dataset_mixer_list <file> 1.0``.

    Args:
        dataset: The intervened dataset (any format :func:`load_pairs` reads).
        out_dir: Folder for the two files (created).
        split: Split of a saved dataset.

    Returns:
        ``{"jsonl", "mixer_args", "n_pairs"}``.
    """
    pairs = load_pairs(dataset, split=split)
    folder = Path(out_dir)
    jsonl = write_jsonl_atomic((pair_to_record(p, "olmo") for p in pairs), folder / "preference_data.jsonl")
    mixer_args = f"--dataset_mixer_list {jsonl.resolve()} 1.0"
    write_text_atomic(mixer_args + "\n", folder / "dataset_mixer_list.txt")
    return {"jsonl": str(jsonl), "mixer_args": mixer_args, "n_pairs": len(pairs)}
