"""Read a set of preference pairs (:func:`load_pairs`) from JSONL, JSON, Parquet, saved ``datasets`` folders or the
hub, fingerprint its content, and write pairs back as JSON Lines.

The records come from :mod:`pairtrace.data.readers`; :mod:`pairtrace.data.layouts` reads each in one of four layouts
(standard, conversational, olmo, hh; ``format`` forces one). Every record becomes either a
:class:`~pairtrace.data.types.Pair` or a :class:`~pairtrace.data.types.BadRecord`; nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from pairtrace.data.layouts import check_layout_name, pair_to_record, parse_record
from pairtrace.data.readers import iter_records
from pairtrace.data.types import BadRecord, Pair, PairSet, describe_skipped
from pairtrace.errors import DataError
from pairtrace.records import atomic_path

logger = logging.getLogger(__name__)


def _fingerprint_line(pair: Pair) -> bytes:
    """Canonical bytes of the fingerprinted content of one pair."""
    content = [pair.id, [[m["role"], m["content"]] for m in pair.prompt], pair.chosen, pair.rejected]
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def compute_fingerprint(pairs: Iterable[Pair]) -> str:
    """SHA-256 over the ids, prompts and responses of pairs, in order.

    The same content gives the same fingerprint whatever file format or layout it was read from;
    rows and metadata (source, models) do not enter it.

    Args:
        pairs: The pairs, in dataset order.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(_fingerprint_line(pair))
    return digest.hexdigest()


def _summarise_layouts(layouts: Counter[str], forced: str) -> str:
    """The ``PairSet.format`` value: the layout shared by all pairs, ``mixed``, or the forced one."""
    if forced != "auto":
        return forced
    if len(layouts) == 1:
        return next(iter(layouts))
    return "mixed" if layouts else ""


def _log_skipped(skipped: list[BadRecord], n_records: int, origin: str) -> None:
    """One warning line with the number of skipped records and the first :data:`SKIPPED_LISTED` of them."""
    if not skipped:
        return
    logger.warning("%s", describe_skipped(skipped, len(skipped), n_records, origin))


def load_pairs(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    split: str | None = None,
    revision: str | None = None,
    strict: bool = False,
    id_column: str | None = None,
    limit: int | None = None,
) -> PairSet:
    """Read preference pairs from a file, a saved ``datasets`` folder or a hub dataset.

    Args:
        source: ``.jsonl``/``.jsonl.gz``, a JSON array file, ``.parquet``, a ``save_to_disk`` folder,
            or a hub dataset id.
        format: Record layout: ``"auto"`` (detected per record), ``"standard"``, ``"conversational"``,
            ``"olmo"`` or ``"hh"``.
        split: Split to read when the dataset has several (default: the only one, else ``"train"``).
        revision: Hub revision; without one a hub load warns that results will not be reproducible.
        strict: Raise at the first bad record instead of skipping it.
        id_column: Column holding the stable id (default: ``id``, ``prompt_id``, ``uid``, ``example_id``,
            else the row index).
        limit: Read at most this many records.

    Returns:
        A :class:`PairSet` where ``n_records == len(pairs) + len(skipped)``.

    Raises:
        DataError: If the input cannot be read, or (with ``strict``) at the first bad record; the message
            names the line or row and the field.
        ConfigError: If ``format`` is unknown.
    """
    check_layout_name(format)
    origin = str(source)
    pairs: list[Pair] = []
    skipped: list[BadRecord] = []
    first_row: dict[str, int] = {}
    layouts: Counter[str] = Counter()
    digest = hashlib.sha256()
    n_records = 0
    progress = tqdm(
        iter_records(source, split=split, revision=revision, limit=limit),
        desc=f"reading {Path(origin).name or origin}",
        unit=" records",
        disable=None,
    )
    for raw in progress:
        n_records += 1
        if raw.bad is not None:
            result: Pair | BadRecord = raw.bad
            layout = None
        else:
            result, layout = parse_record(raw.data, raw.row, raw.line, format, id_column)
        if isinstance(result, Pair) and result.id in first_row:
            reason = f"duplicate id '{result.id}' (first used by row {first_row[result.id]})"
            result = BadRecord(raw.row, raw.line, id_column or "id", reason)
        if isinstance(result, BadRecord):
            if strict:
                raise DataError(f"{result} (in {origin})")
            skipped.append(result)
            continue
        first_row[result.id] = result.row
        pairs.append(result)
        digest.update(_fingerprint_line(result))
        layouts[layout or format] += 1
    _log_skipped(skipped, n_records, origin)
    return PairSet(
        pairs=pairs,
        skipped=skipped,
        origin=origin,
        format=_summarise_layouts(layouts, format),
        fingerprint=digest.hexdigest(),
        n_records=n_records,
    )


def save_pairs_jsonl(pairs: Iterable[Pair], path: str | os.PathLike, *, layout: str = "standard") -> int:
    """Write pairs as JSON Lines (gzip-compressed when the name ends with ``.gz``), one record per pair.

    The file is written next to its destination and renamed into place, so a failure leaves no partial file.

    Args:
        pairs: The pairs to write, in order.
        path: Destination file.
        layout: Record layout, see :func:`pair_to_record`; ``"standard"`` by default.

    Returns:
        The number of records written.

    Raises:
        DataError: If a pair cannot be expressed in ``layout``.
    """
    target = Path(path)
    opener = gzip.open if target.name.lower().endswith(".gz") else open
    count = 0
    with atomic_path(target) as tmp, opener(tmp, "wt", encoding="utf-8", newline="\n") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair_to_record(pair, layout), ensure_ascii=False) + "\n")
            count += 1
    return count
