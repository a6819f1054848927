"""The built-in model organism: M0 (SFT) -> M1 (DPO on a mix with a contaminated slice), built offline on a CPU.

Public entry points (imported lazily, so importing this package stays cheap)::

    from pairtrace.organism import run_build, build_organism, load_organism_config
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OrganismConfig": "pairtrace.organism.build_config",
    "SliceSpec": "pairtrace.organism.build_config",
    "build_organism_config": "pairtrace.organism.build_config",
    "load_organism_config": "pairtrace.organism.build_config",
    "build_organism": "pairtrace.organism.build",
    "run_build": "pairtrace.organism.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pairtrace.organism' has no attribute {name!r}")
