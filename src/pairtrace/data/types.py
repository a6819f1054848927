"""Core records shared by every stage: a preference pair, a bad record, a loaded pair set."""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
"""One chat turn: ``{"role": "user" | "assistant" | "system", "content": str}``."""


@dataclass(frozen=True)
class Pair:
    """One preference datapoint d = (prompt, chosen, rejected) plus metadata.

    Attributes:
        id: Stable identifier (the dataset's id column, else the row index as a string).
        row: Zero-based index of the record in the input (before any record was skipped).
        prompt: The conversation before the response: every turn before the final assistant turn.
        chosen: Text of the preferred final assistant turn.
        rejected: Text of the dispreferred final assistant turn.
        source: Optional dataset/source name.
        chosen_model: Optional name of the model that wrote ``chosen``.
        rejected_model: Optional name of the model that wrote ``rejected``.
    """

    id: str
    row: int
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str | None = None
    chosen_model: str | None = None
    rejected_model: str | None = None


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be turned into a :class:`Pair`.

    Attributes:
        row: Zero-based record index in the input.
        line: One-based line number for line-oriented files (JSONL), else ``None``.
        field: The offending field, when one can be named.
        reason: Human-readable explanation.
    """

    row: int
    line: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"row {self.row}"
        what = f" field '{self.field}'" if self.field else ""
        return f"{where}{what}: {self.reason}"


SKIPPED_LISTED = 20
"""Skipped records listed by name in the warning that counts them (the rest are counted)."""


def describe_skipped(first: list[BadRecord], n_skipped: int, n_records: int | None, origin: str) -> str:
    """One line naming the skipped records: ``skipped 2 of 10 record(s) in f.jsonl: line 3 field 'chosen': ...``.

    Args:
        first: The first skipped records (at most :data:`SKIPPED_LISTED` are listed).
        n_skipped: How many were skipped in all.
        n_records: How many records were read (None when unknown).
        origin: The input as the user named it.
    """
    listed = "; ".join(str(bad) for bad in first[:SKIPPED_LISTED])
    more = f"; and {n_skipped - min(len(first), SKIPPED_LISTED)} more" if n_skipped > min(len(first),
                                                                                         SKIPPED_LISTED) else ""
    of = f" of {n_records}" if n_records is not None else ""
    return f"skipped {n_skipped}{of} record(s) in {origin}: {listed}{more}"


@dataclass
class PairSet:
    """Pairs read from one input, with everything that was skipped and a content fingerprint.

    Attributes:
        pairs: The valid pairs, in input order.
        skipped: Records that were reported and skipped.
        origin: Path or hub id the pairs came from.
        format: Detected layout (``standard``, ``conversational``, ``olmo``, ``hh``).
        fingerprint: SHA-256 over ids and texts of the valid pairs (identifies the dataset in manifests).
        n_records: Number of records read (``len(pairs) + len(skipped)``).
    """

    pairs: list[Pair]
    skipped: list[BadRecord] = field(default_factory=list)
    origin: str = ""
    format: str = ""
    fingerprint: str = ""
    n_records: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]
