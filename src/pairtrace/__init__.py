"""pairtrace: trace behaviours learned in preference training back to the pairs that taught them.

The public API is importable from the top level; heavy modules load on first use, so ``import pairtrace``
(and the command line's ``--help``) stays fast::

    import pairtrace as pt
    m0 = pt.load_model("path/to/m0")
    store = pt.compute_datapoint_vectors(m0, pt.load_pairs("pairs.jsonl"), "vectors/")
    probe = pt.compute_behaviour_vectors(m0, pt.load_triples("triples.jsonl"))
    ranking = pt.compute_attribution(store, probe)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_pairs": "pairtrace.data.pairs",
    "Pair": "pairtrace.data.types",
    "PairSet": "pairtrace.data.types",
    "load_model": "pairtrace.models",
    "ModelSpec": "pairtrace.model_spec",
    "compute_response_means": "pairtrace.activations",
    "compute_datapoint_vectors": "pairtrace.vectors",
    "compute_behaviour_vectors": "pairtrace.behaviour",
    "load_triples": "pairtrace.behaviour",
    "save_behaviour_vectors": "pairtrace.behaviour",
    "load_behaviour_vectors": "pairtrace.behaviour",
    "VectorStore": "pairtrace.store",
    "AttributionConfig": "pairtrace.attribute",
    "compute_attribution": "pairtrace.attribute",
    "save_ranking": "pairtrace.attribute",
    "load_ranking": "pairtrace.attribute",
    "load_examples": "pairtrace.screening",
    "compute_example_behaviour": "pairtrace.screening",
    "save_behaviour": "pairtrace.behaviour_library",
    "load_behaviour": "pairtrace.behaviour_library",
    "list_behaviours": "pairtrace.behaviour_library",
    "compute_screen": "pairtrace.screen",
    "run_screen": "pairtrace.screen",
    "InterventionSpec": "pairtrace.intervene",
    "run_intervention": "pairtrace.intervene",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairtrace' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
