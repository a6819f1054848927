"""Where the shared evaluation data (AdvBench, IFEval, XSTest, HH-RLHF, distractors) lives."""

from __future__ import annotations

import os
from pathlib import Path

from pairtrace.errors import ConfigError

SHARED_DATA_ENV = "PAIRTRACE_SHARED_DATA"
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "public"
"""Unmodified copies of the public evaluation files (licences and checksums in its README.md)."""
"""Environment variable that overrides the location of the shared data folder."""


def default_shared_data_dir() -> Path:
    """Return the default shared data folder, ``<repo>/../shared/data``, whether or not it exists.

    Returns:
        The path next to the repository that holds ``src/pairtrace``.
    """
    repo_root = Path(__file__).resolve().parents[3]  # src/pairtrace/data/paths.py -> repo root
    return repo_root.parent / "shared" / "data"


def shared_data_dir() -> Path:
    """Locate the shared evaluation data folder.

    The folder is taken from the ``PAIRTRACE_SHARED_DATA`` environment variable when it is set,
    else ``<repo>/../shared/data``, else the copies shipped in the package (``pairtrace/data/public``).

    Returns:
        The existing folder.

    Raises:
        ConfigError: If the folder does not exist (the message says how to point to it).
    """
    configured = os.environ.get(SHARED_DATA_ENV)
    path = Path(configured).expanduser() if configured else default_shared_data_dir()
    if not configured and not path.is_dir() and PACKAGED_DATA_DIR.is_dir():
        return PACKAGED_DATA_DIR  # the byte-identical copies shipped inside the package
    if not path.is_dir():
        how = f"set by {SHARED_DATA_ENV}" if configured else f"default; set {SHARED_DATA_ENV} to override"
        raise ConfigError(f"shared data folder not found: {path} ({how})")
    return path
