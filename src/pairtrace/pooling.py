"""Response pooling: which tokens of a teacher-forced response make up its activation vector, and how.

A datapoint vector (paper Def. 3.2) and a behaviour vector (Def. 3.1) are differences of *response means*: the
layer-k activations of a response, averaged over its tokens. :class:`ResponsePooling` is the one description of
that average, used by every step that computes or compares response means:

- teacher forcing keeps only the response tokens it pools (:meth:`ResponsePooling.keep`);
- the batch collation weights each kept token (:meth:`ResponsePooling.weights`), the capture sums the weighted
  activations, and :meth:`ResponsePooling.reduce` turns the sums into means;
- vector stores and behaviour vectors record it in their ``settings`` (:meth:`ResponsePooling.to_settings`,
  :meth:`ResponsePooling.from_settings`), and vectors pooled differently are never compared
  (:meth:`ResponsePooling.mismatch`).

Two poolings exist: the paper's mean over every response token (the default), and the mean over each response's
first N tokens. The choice a behaviour is about (answer or refuse, which opening) is often made at the first
tokens, while the rest of the response carries its topic and style; in a causal model the first N positions never
see the later tokens, so the head mean is the mean of a response cut after N tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pairtrace.errors import ConfigError

SETTINGS_KEY = "response_tokens"
"""Key of the pooled head length in a manifest's ``settings`` (absent: every token, as in stores made before
head pooling existed)."""


@dataclass(frozen=True)
class ResponsePooling:
    """How a response's token activations are pooled into one vector.

    Attributes:
        tokens: Pool each response's first this many tokens; ``None``: every response token (the paper's mean).
    """

    tokens: int | None = None

    def __post_init__(self) -> None:
        tokens = self.tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ConfigError(f"response_tokens must be a positive number of tokens or None, got {tokens!r}")

    @classmethod
    def resolve(cls, pooling: ResponsePooling | None = None, response_tokens: int | None = None) -> ResponsePooling:
        """The pooling of a call that accepts either a pooling or the ``response_tokens`` shorthand.

        Args:
            pooling: A pooling, or ``None``.
            response_tokens: Tokens pooled per response (``None``: all); used when ``pooling`` is ``None``.

        Returns:
            ``pooling``, or the pooling of ``response_tokens``.

        Raises:
            ConfigError: Both are given and disagree, or ``response_tokens`` is not a positive number of tokens.
        """
        if pooling is None:
            return cls(response_tokens)
        if response_tokens is not None and response_tokens != pooling.tokens:
            raise ConfigError(f"pooling {pooling.describe()!r} and response_tokens={response_tokens!r} disagree; "
                              "give one of them")
        return pooling

    @property
    def response_tokens(self) -> int | None:
        """The ``response_tokens`` value of this pooling (``None``: every token)."""
        return self.tokens

    @property
    def name(self) -> str:
        """Short name for directories: ``all-tokens`` or ``first-N-tokens``."""
        return "all-tokens" if self.tokens is None else f"first-{self.tokens}-tokens"

    def describe(self) -> str:
        """What a response mean covers, in words: ``every token`` or ``the first N tokens``."""
        return "every token" if self.tokens is None else f"the first {self.tokens} tokens"

    # ------------------------------------------------------------------------------------------- computation

    def keep(self, response_ids: Sequence[int]) -> list[int]:
        """The response tokens to teacher-force (the tokens after them cannot change the pooled positions)."""
        return list(response_ids[: self.tokens])

    def weights(self, n_tokens: int) -> torch.Tensor:
        """Weight ``[n_tokens]`` float32 of each teacher-forced response token in the pooled sum (all ones: a mean
        over the tokens :meth:`keep` kept)."""
        return torch.ones(n_tokens, dtype=torch.float32)

    def reduce(self, sums: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pooled vectors from weighted activation sums.

        Args:
            sums: ``[B, S, L, d]`` float32: per row, segment (a response) and layer, the activations summed with
                the weights of ``masks``.
            masks: ``[B, S, T]`` float32 weights of each position (from :meth:`weights`; 0 elsewhere).

        Returns:
            ``[B, S, L, d]`` float32 means; NaN for a response without tokens (0 / 0).
        """
        counts = masks.sum(dim=2)  # [B, S]
        return sums / counts[:, :, None, None]  # [B, S, L, d]

    # ----------------------------------------------------------------------------------------------- records

    def to_settings(self) -> dict[str, Any]:
        """This pooling's entries of a manifest's ``settings``: none for every token (so stores made before head
        pooling still match), ``{"response_tokens": N}`` for a head."""
        return {} if self.tokens is None else {SETTINGS_KEY: self.tokens}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> ResponsePooling:
        """The pooling recorded in a manifest's (or behaviour vectors') ``settings``; absent: every token."""
        return cls((settings or {}).get(SETTINGS_KEY))

    def mismatch(self, other: ResponsePooling, mine: str = "datapoint vectors",
                 theirs: str = "behaviour vectors") -> str | None:
        """Why vectors pooled like ``self`` cannot be compared with vectors pooled like ``other`` (``None``: they
        can). Response means over different parts of the responses live in different spaces.

        Args:
            other: The other vectors' pooling.
            mine: What this pooling's vectors are, for the message.
            theirs: What the other vectors are.
        """
        if self == other:
            return None
        return (f"response_tokens (tokens pooled per response; None = all): {mine} {self.tokens!r} vs {theirs} "
                f"{other.tokens!r}")


MEAN = ResponsePooling()
"""The paper's pooling: the mean over every response token."""


def mean_of_responses(means: torch.Tensor) -> torch.Tensor:
    """Average several responses' pooled vectors ``[n, d]`` into one ``[d]``, leaving out the responses without
    tokens (NaN rows, see :meth:`ResponsePooling.reduce`); NaN if none has tokens."""
    return torch.nanmean(means, dim=0)


__all__ = ["MEAN", "SETTINGS_KEY", "ResponsePooling", "mean_of_responses"]
