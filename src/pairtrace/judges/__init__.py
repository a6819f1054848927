"""Judges: decide whether a response shows the behaviour (harmful) or not, or say unknown."""

from pairtrace.judges.base import Judge, Verdict

__all__ = ["Judge", "Verdict"]
