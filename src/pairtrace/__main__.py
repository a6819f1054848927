"""``python -m pairtrace`` runs the command line."""

from pairtrace.cli import run

run()
