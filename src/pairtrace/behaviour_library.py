"""A behaviour library: named behaviour vectors built from examples, each saved with its own manifest.

Layout of a library directory::

    LIB/<name>/behaviour.safetensors   per-example vectors and the probe (pairtrace.behaviour's files)
    LIB/<name>/behaviour.json          their metadata (model, template, layers, pooling)
    LIB/<name>/entry.json              the manifest: name, model, layer, pooling, SHA-256 of the examples,
                                       the calibrated threshold and the leave-one-out scores it came from

A library entry is applied to any vector store of the same model (weights hash), chat template, layer and
response pooling; :func:`check_entry_matches_store` refuses the others, as attribution does.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.attribute import check_behaviour_matches_store
from pairtrace.behaviour import BehaviourVectors, load_behaviour_vectors, save_behaviour_vectors
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.pooling import ResponsePooling
from pairtrace.records import write_text_atomic

ENTRY_FILE = "entry.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Calibration:
    """The threshold calibrated on a behaviour's own examples.

    Attributes:
        loo_scores: Per example, the cosine of its own (with − without) vector with the behaviour vector built
            from the other examples (leave-one-out).
        quantile: The quantile of ``loo_scores`` taken as the threshold.
        threshold: A pair passes when its cosine with the behaviour vector is at least this.
    """

    loo_scores: list[float]
    quantile: float
    threshold: float


@dataclass
class LibraryBehaviour:
    """One named behaviour of a library: its vectors, calibration and manifest.

    Attributes:
        name: The behaviour's name (a directory name: letters, digits, ``_``, ``.``, ``-``).
        vectors: Behaviour vectors from the examples (one row of ``per_triple`` per example; ``probe`` scores).
        calibration: The threshold calibrated on the examples.
        layer: The layer the vectors were computed at.
        examples_sha256: SHA-256 of the examples (prompt, with, without), in order.
        description: Free text (what the behaviour is, where the examples came from).
        source: Where the examples came from (a file path, or ``instructions``).
    """

    name: str
    vectors: BehaviourVectors
    calibration: Calibration
    layer: int
    examples_sha256: str
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pooling(self) -> ResponsePooling:
        """The response pooling of the vectors (the store scored against them must use the same)."""
        return self.vectors.pooling

    @property
    def n_examples(self) -> int:
        """Number of examples the behaviour was built from."""
        return int(self.vectors.per_triple.shape[0])

    def manifest(self) -> dict[str, Any]:
        """The plain-data manifest saved as ``entry.json``."""
        meta = self.vectors.metadata
        return {
            "kind": "library-behaviour",
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "model": dict(meta.get("model") or {}),
            "template": dict(meta.get("template") or {}),
            "layer": self.layer,
            "pooling": {"response_tokens": self.pooling.tokens, "name": self.pooling.name},
            "settings": dict(meta.get("settings") or {}),
            "n_examples": self.n_examples,
            "examples_sha256": self.examples_sha256,
            "calibration": asdict(self.calibration),
            "pairtrace_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **self.extra,
        }


def check_name(name: str) -> str:
    """Return ``name`` if it can name a library entry.

    Raises:
        ConfigError: Empty, too long, or with characters other than letters, digits, ``_``, ``.`` and ``-``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"behaviour name {name!r}: use letters, digits, '_', '.' and '-' (at most 100, not "
                          "starting with a punctuation mark)")
    return name


def behaviour_path(library: str | Path, name: str) -> Path:
    """The directory of behaviour ``name`` in ``library``."""
    return Path(library) / check_name(name)


def behaviour_exists(library: str | Path, name: str) -> bool:
    """Whether ``library`` holds a behaviour called ``name``."""
    return (behaviour_path(library, name) / ENTRY_FILE).is_file()


def save_behaviour(library: str | Path, behaviour: LibraryBehaviour, *, overwrite: bool = False) -> Path:
    """Save a behaviour into a library (created if missing).

    Args:
        library: The library directory.
        behaviour: The behaviour.
        overwrite: Replace an entry of the same name (otherwise refused).

    Returns:
        The behaviour's directory.

    Raises:
        ConfigError: The name is taken and ``overwrite`` is false.
    """
    directory = behaviour_path(library, behaviour.name)
    if behaviour_exists(library, behaviour.name) and not overwrite:
        raise ConfigError(f"{directory}: the library already has a behaviour {behaviour.name!r}; choose another "
                          "name or pass --overwrite")
    save_behaviour_vectors(behaviour.vectors, directory)
    write_text_atomic(json.dumps(behaviour.manifest(), indent=1, ensure_ascii=False), directory / ENTRY_FILE)
    return directory


def read_entry(library: str | Path, name: str) -> dict[str, Any]:
    """The manifest (``entry.json``) of one behaviour.

    Raises:
        DataError: No such behaviour, or a manifest that is not valid JSON or lacks a field.
    """
    path = behaviour_path(library, name) / ENTRY_FILE
    if not path.is_file():
        known = ", ".join(list_behaviours(library)) or "none"
        raise DataError(f"{Path(library)}: no behaviour {name!r} in this library (known: {known})")
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("name", "layer", "calibration", "examples_sha256"):
        if key not in entry:
            raise DataError(f"{path} field '{key}': missing")
    return entry


def load_behaviour(library: str | Path, name: str) -> LibraryBehaviour:
    """Load one behaviour saved by :func:`save_behaviour`.

    Raises:
        DataError: Missing or damaged files.
    """
    entry = read_entry(library, name)
    vectors = load_behaviour_vectors(behaviour_path(library, name))
    cal = entry["calibration"]
    try:
        calibration = Calibration(loo_scores=[float(x) for x in cal["loo_scores"]], quantile=float(cal["quantile"]),
                                  threshold=float(cal["threshold"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{behaviour_path(library, name) / ENTRY_FILE} field 'calibration': {exc}") from exc
    return LibraryBehaviour(name=entry["name"], vectors=vectors, calibration=calibration, layer=int(entry["layer"]),
                            examples_sha256=entry["examples_sha256"], description=entry.get("description", ""),
                            source=entry.get("source", ""))


def list_behaviours(library: str | Path) -> list[str]:
    """Names of the behaviours in a library, sorted (an absent library has none)."""
    root = Path(library)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / ENTRY_FILE).is_file())


def load_library(library: str | Path, names: list[str] | None = None) -> list[LibraryBehaviour]:
    """Load the named behaviours (default: all) of a library.

    Raises:
        DataError: An empty library, or an unknown name.
    """
    names = names or list_behaviours(library)
    if not names:
        raise DataError(f"{Path(library)}: no behaviour in this library (add one with `pairtrace behaviours add`)")
    return [load_behaviour(library, n) for n in names]


def check_entry_matches_store(store: Any, behaviour: LibraryBehaviour) -> None:
    """Refuse a behaviour whose model, template, pooling or layer differ from a vector store's.

    Raises:
        ManifestMismatchError: Naming the behaviour and every difference.
    """
    try:
        check_behaviour_matches_store(store, behaviour.vectors)
    except ManifestMismatchError as exc:
        raise ManifestMismatchError(f"behaviour {behaviour.name!r}: {exc}") from None
    if behaviour.layer not in list(store.layers):
        raise ManifestMismatchError(
            f"behaviour {behaviour.name!r} was built at layer {behaviour.layer}, but the datapoint vectors were "
            f"stored at layers {list(store.layers)}"
        )


__all__ = [
    "Calibration",
    "LibraryBehaviour",
    "behaviour_exists",
    "behaviour_path",
    "check_entry_matches_store",
    "list_behaviours",
    "load_behaviour",
    "load_library",
    "read_entry",
    "save_behaviour",
]
