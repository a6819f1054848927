"""The ``pairtrace`` command line.

Every command takes ``--config FILE.yaml``: its keys are the command's option names (``-`` or ``_``), values in
the file fill the options not given on the command line, and flags always win. Option groups shared by several
commands (the model, sampling, the judge, the DPO recipe) are the fields of their options dataclass, added by
:func:`pairtrace.options.cli_options`, so each option is defined once. Heavy work imports happen inside the
commands.

Modules: ``common`` (the app, option groups, shared helpers), ``attribution`` (vectors, merge-vectors, behaviour,
attribute, sources, discover, steer), ``generation`` (generate, judge, evaluate, triples, serve), ``experiment``
(run, report, intervene, retrain, organism build), ``screening`` (behaviours add|list, screen).
"""

from __future__ import annotations

import sys

from pairtrace.cli import attribution, experiment, generation, screening  # noqa: F401  (importing registers the commands)
from pairtrace.cli.common import app

__all__ = ["app", "run"]


def run() -> None:
    """Entry point used by ``python -m pairtrace``."""
    sys.exit(app())
