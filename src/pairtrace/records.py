"""JSON Lines files written atomically: the one writer shared by every stage."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as UTF-8 JSON Lines to a temporary file, then rename it over ``path``.

    A reader never sees a half-written file: it finds the old content or the new one.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
