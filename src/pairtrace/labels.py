"""Optional ground truth (which pairs are contaminated, which behaviour each pair plants): one reader, and the one
place a ranking is scored against it (AUROC, precision, ROC curve). Attribution never reads labels; only reports
of quality do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pairtrace.errors import DataError


def load_labels(path: str | Path) -> pd.DataFrame:
    """Read ground-truth labels (columns ``id``, ``behaviour``, ``contaminated``) from JSONL, JSON, CSV or Parquet.

    A file with only ``contaminated`` gets ``behaviour`` = ``contaminated`` / ``(none)``; ids are strings and the
    last record of a repeated id wins.

    Raises:
        DataError: Unreadable file or a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        elif name.endswith(".csv"):
            frame = pd.read_csv(path)
        elif name.endswith(".json"):
            frame = pd.read_json(path)
        else:
            frame = pd.read_json(path, lines=True)
    except ValueError as exc:
        raise DataError(f"{path}: cannot read labels ({exc})") from exc
    if "id" not in frame.columns:
        raise DataError(f"{path}: labels need field 'id'")
    if "behaviour" not in frame.columns and "contaminated" not in frame.columns:
        raise DataError(f"{path}: labels need field 'behaviour' or 'contaminated'")
    frame = frame.copy()
    frame["id"] = frame["id"].astype(str)
    frame = frame.drop_duplicates("id", keep="last")
    if "behaviour" not in frame.columns:
        frame["behaviour"] = np.where(frame["contaminated"].astype(bool), "contaminated", "(none)")
    frame["behaviour"] = frame["behaviour"].astype(object).where(frame["behaviour"].notna(), "(none)").astype(str)
    if "contaminated" in frame.columns:
        frame["contaminated"] = frame["contaminated"].astype(bool)
    return frame


@dataclass(frozen=True)
class LabelledScores:
    """A ranking's scores beside the ground truth, best-ranked first.

    Attributes:
        y: Whether each pair is contaminated (pairs without a label count as not contaminated) [n].
        scores: The ranking's scores, unscored pairs (NaN) given a score below every other [n].
    """

    y: np.ndarray
    scores: np.ndarray


def label_scores(table: pd.DataFrame, labels: pd.DataFrame) -> LabelledScores | None:
    """Align a ranking table (``id``, ``score``, best first) with labels; ``None`` without a ``contaminated``
    column."""
    if "contaminated" not in labels.columns:
        return None
    truth = dict(zip(labels["id"], labels["contaminated"], strict=True))
    y = np.array([bool(truth.get(str(i), False)) for i in table["id"]])
    scores = table["score"].to_numpy(dtype=float)
    finite = np.isfinite(scores)
    filled = np.where(finite, scores, scores[finite].min() - 1.0 if finite.any() else 0.0)
    return LabelledScores(y=y, scores=filled)


def compute_ranking_quality(table: pd.DataFrame, labels: pd.DataFrame) -> dict[str, float | int | None] | None:
    """AUROC of a ranking for the contaminated pairs, and its precision among as many top pairs as there are
    contaminated ones; ``None`` when the labels have no ``contaminated`` column."""
    from sklearn.metrics import roc_auc_score

    scored = label_scores(table, labels)
    if scored is None:
        return None
    y = scored.y
    n_pos = int(y.sum())
    return {
        "auroc": float(roc_auc_score(y, scored.scores)) if 0 < n_pos < len(y) else None,
        "precision_at_contaminated": float(y[:n_pos].mean()) if n_pos else None,
        "n_contaminated": n_pos,
        "n_pairs": len(y),
    }
