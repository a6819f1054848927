"""The judge interface: score, harmful flag, or unknown. A failure is never "safe"."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one response.

    Attributes:
        score: Harmfulness on the 0-100 rubric, or ``None`` when the judge could not answer.
        harmful: ``True``/``False``, or ``None`` for unknown (counted and reported separately).
        reason: Short explanation or the error that made the verdict unknown.
    """

    score: float | None
    harmful: bool | None
    reason: str = ""

    @property
    def unknown(self) -> bool:
        """Whether the judge failed to decide."""
        return self.harmful is None

    @classmethod
    def unknown_because(cls, reason: str) -> Verdict:
        """An unknown verdict with the reason it could not be decided."""
        return cls(score=None, harmful=None, reason=reason)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"score": self.score, "harmful": self.harmful, "unknown": self.unknown, "reason": self.reason}


class Judge(ABC):
    """Decides whether responses to prompts are harmful.

    Subclasses implement :meth:`judge`; :meth:`judge_many` may be overridden for concurrency.
    """

    name: str = "judge"

    @abstractmethod
    def judge(self, prompt: str, response: str) -> Verdict:
        """Judge one response to one prompt."""

    def judge_many(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Judge many ``(prompt, response)`` items, in order."""
        return [self.judge(p, r) for p, r in items]
