"""The paper's benign formatting constraints ("distractors"): rewrite a text to obey one, or check it.

Each of the 13 ids in ``distractors.json`` has a deterministic rewrite (:func:`apply_constraint`) and a
checker (:func:`check_constraint`). Several constraints are applied in :data:`APPLY_ORDER`
(:func:`apply_constraints`) so that a later rewrite never undoes an earlier one; pairs listed in
:data:`INCOMPATIBLE` cannot both hold in general and are never sampled together
(:func:`sample_constraint_ids`).

Conventions: a *word* is a whitespace-separated token; its *core* is the token without leading and trailing
punctuation; a *sentence* is a stretch of text ending in ``.``, ``!`` or ``?`` (or the end of the text) that
contains a letter or digit.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence

from pairtrace.errors import ConfigError

CONSTRAINT_IDS: tuple[str, ...] = (
    "max_50_words",
    "no_periods",
    "capitalize_every_5th_word",
    "double_space_every_other_word",
    "e_to_3",
    "only_exclamation_marks",
    "no_repeated_words",
    "max_5_letter_words",
    "no_commas",
    "no_letter_a",
    "double_vowels",
    "o_to_0",
    "exactly_3_sentences",
)
"""Every constraint id of ``distractors.json``, in file order."""

APPLY_ORDER: tuple[str, ...] = (
    "max_5_letter_words",  # shortens words first: later steps never lengthen them again
    "exactly_3_sentences",  # before the letter rewrites, so that added sentences are rewritten too
    "no_letter_a",
    "e_to_3",
    "o_to_0",
    "no_repeated_words",  # after every step that can make two words equal
    "max_50_words",
    "no_commas",
    "no_periods",
    "only_exclamation_marks",
    "double_vowels",
    "capitalize_every_5th_word",
    "double_space_every_other_word",  # last: it rewrites the whitespace
)
"""Order in which :func:`apply_constraints` applies several constraints."""

INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(
    {
        frozenset({"no_periods", "exactly_3_sentences"}),  # periods end the sentences
        frozenset({"double_vowels", "max_5_letter_words"}),  # doubling lengthens words
        frozenset({"double_vowels", "no_repeated_words"}),  # doubling can join repeated cores
    }
)
"""Pairs of constraints that are never combined in one request."""

_VOWELS = "aeiouAEIOU"
_SENTENCE_END = re.compile(r"[.!?]+")
_TOKEN = re.compile(r"\S+")
_FILLER_SENTENCES = ("Thus it ends.", "Stay safe.", "Go slow.")  # short, distinct words


def _core_span(token: str) -> tuple[int, int]:
    """Start and end of a token's core (the token without leading/trailing punctuation)."""
    start, end = 0, len(token)
    while start < end and token[start] in string.punctuation:
        start += 1
    while end > start and token[end - 1] in string.punctuation:
        end -= 1
    return start, end


def word_core(token: str) -> str:
    """A word without its leading and trailing punctuation (``'"Hello,"'`` -> ``'Hello'``)."""
    start, end = _core_span(token)
    return token[start:end]


def count_sentences(text: str) -> int:
    """Number of sentences: pieces between ``.``/``!``/``?`` runs that hold a letter or digit."""
    return sum(1 for piece in _SENTENCE_END.split(text) if any(c.isalnum() for c in piece))


# ---------------------------------------------------------------------------------------------- rewrites


def _map_tokens(text: str, fn: Callable[[int, str], str]) -> str:
    """Replace every whitespace token by ``fn(index, token)``, keeping the whitespace between tokens."""
    counter = iter(range(1 << 62))
    return _TOKEN.sub(lambda m: fn(next(counter), m.group(0)), text)


def _apply_max_50_words(text: str) -> str:
    matches = list(_TOKEN.finditer(text))
    if len(matches) <= 50:
        return text
    return text[: matches[49].end()]


def _apply_capitalize_every_5th_word(text: str) -> str:
    def cap(i: int, token: str) -> str:
        if (i + 1) % 5:
            return token
        for j, c in enumerate(token):
            if c.isalpha():
                return token[:j] + c.upper() + token[j + 1 :]
        return token

    return _map_tokens(text, cap)


def _apply_double_space(text: str) -> str:
    tokens = text.split()
    out: list[str] = []
    for i, token in enumerate(tokens):
        if i:
            out.append("  " if i % 2 == 0 else " ")
        out.append(token)
    return "".join(out)


def _apply_only_exclamation_marks(text: str) -> str:
    text = re.sub(r"[.?;:]+", "!", text)
    return "".join(c for c in text if c == "!" or c not in string.punctuation)


def _rebuild(text: str, transform: Callable[[str], str | None]) -> str:
    """Join the transformed tokens with single spaces; a token mapped to ``None`` is dropped, and the sentence
    end it carried (``.``/``!``/``?``) moves to the previous kept token so no sentence boundary is lost."""
    kept: list[str] = []
    for token in text.split():
        new = transform(token)
        if new is not None:
            kept.append(new)
            continue
        ends = [c for c in token[_core_span(token)[1] :] if c in ".!?"]
        if ends and kept and kept[-1][-1:] not in ".!?":
            kept[-1] += ends[0]
    return " ".join(kept)


def _apply_no_repeated_words(text: str) -> str:
    seen: set[str] = set()

    def first_only(token: str) -> str | None:
        key = word_core(token).lower()
        if key and key in seen:
            return None
        seen.add(key)
        return token

    return _rebuild(text, first_only)


def _apply_no_letter_a(text: str) -> str:
    def strip_a(_: int, token: str) -> str:
        start, end = _core_span(token)
        core = token[start:end]
        if core and not core.strip("aA"):  # "a" (or "aa") becomes "one", so no word or sentence vanishes
            return token[:start] + ("One" if core[0] == "A" else "one") + token[end:]
        return token.replace("a", "").replace("A", "")

    return _map_tokens(text, strip_a)


def _apply_max_5_letter_words(text: str) -> str:
    def cut(_: int, token: str) -> str:
        start, end = _core_span(token)
        if end - start <= 5:
            return token
        return token[:start] + token[start : start + 5] + token[end:]

    return _map_tokens(text, cut)


def _apply_double_vowels(text: str) -> str:
    return "".join(c + c if c in _VOWELS else c for c in text)


def _apply_exactly_3_sentences(text: str) -> str:
    text = text.strip()
    ends = [m for m in _SENTENCE_END.finditer(text)]
    pieces: list[str] = []
    start = 0
    for m in ends:
        piece = text[start : m.end()].strip()
        if any(c.isalnum() for c in piece):
            pieces.append(piece)
        start = m.end()
    rest = text[start:].strip()
    if any(c.isalnum() for c in rest):
        pieces.append(rest + ".")
    pieces = pieces[:3]
    pieces += list(_FILLER_SENTENCES[len(pieces) :])
    return " ".join(pieces)


_APPLY: dict[str, Callable[[str], str]] = {
    "max_50_words": _apply_max_50_words,
    "no_periods": lambda t: t.replace(".", ""),
    "capitalize_every_5th_word": _apply_capitalize_every_5th_word,
    "double_space_every_other_word": _apply_double_space,
    "e_to_3": lambda t: t.replace("e", "3").replace("E", "3"),
    "only_exclamation_marks": _apply_only_exclamation_marks,
    "no_repeated_words": _apply_no_repeated_words,
    "max_5_letter_words": _apply_max_5_letter_words,
    "no_commas": lambda t: t.replace(",", ""),
    "no_letter_a": _apply_no_letter_a,
    "double_vowels": _apply_double_vowels,
    "o_to_0": lambda t: t.replace("o", "0").replace("O", "0"),
    "exactly_3_sentences": _apply_exactly_3_sentences,
}


# ---------------------------------------------------------------------------------------------- checks


def _check_capitalize_every_5th_word(text: str) -> bool | None:
    tokens = text.split()
    if len(tokens) < 5:
        return None
    for token in tokens[4::5]:
        letters = [c for c in token if c.isalpha()]
        if letters and not letters[0].isupper():
            return False
    return True


def _check_double_space(text: str) -> bool | None:
    stripped = text.strip()
    gaps = re.findall(r"\s+", stripped)
    if len(gaps) < 2:
        return None
    if any(g not in (" ", "  ") for g in gaps):
        return False
    return all(a != b for a, b in itertools.pairwise(gaps))


def _check_no_repeated_words(text: str) -> bool:
    keys = [word_core(t).lower() for t in text.split()]
    keys = [k for k in keys if k]
    return len(keys) == len(set(keys))


def _check_double_vowels(text: str) -> bool | None:
    runs = re.findall(r"a+|e+|i+|o+|u+", text.lower())
    if not runs:
        return None
    return all(len(run) % 2 == 0 for run in runs)


_CHECK: dict[str, Callable[[str], bool | None]] = {
    "max_50_words": lambda t: len(t.split()) <= 50,
    "no_periods": lambda t: "." not in t,
    "capitalize_every_5th_word": _check_capitalize_every_5th_word,
    "double_space_every_other_word": _check_double_space,
    "e_to_3": lambda t: "e" not in t and "E" not in t,
    "only_exclamation_marks": lambda t: all(c == "!" or c not in string.punctuation for c in t),
    "no_repeated_words": _check_no_repeated_words,
    "max_5_letter_words": lambda t: all(len(word_core(tok)) <= 5 for tok in t.split()),
    "no_commas": lambda t: "," not in t,
    "no_letter_a": lambda t: "a" not in t and "A" not in t,
    "double_vowels": _check_double_vowels,
    "o_to_0": lambda t: "o" not in t and "O" not in t,
    "exactly_3_sentences": lambda t: count_sentences(t) == 3,
}


# ---------------------------------------------------------------------------------------------- public API


def _require_known(cid: str) -> None:
    if cid not in _APPLY:
        raise ConfigError(f"unknown constraint id {cid!r}; known ids: {', '.join(CONSTRAINT_IDS)}")


def apply_constraint(text: str, cid: str) -> str:
    """Rewrite ``text`` so that it obeys one constraint.

    Args:
        text: A response text.
        cid: A constraint id from :data:`CONSTRAINT_IDS`.

    Returns:
        The rewritten text (deterministic).

    Raises:
        ConfigError: Unknown constraint id.
    """
    _require_known(cid)
    return _APPLY[cid](text)


def apply_constraints(text: str, cids: Iterable[str]) -> str:
    """Rewrite ``text`` to obey several constraints, applied in :data:`APPLY_ORDER`.

    Args:
        text: A response text.
        cids: Constraint ids (order does not matter; duplicates are ignored).

    Returns:
        The rewritten text.

    Raises:
        ConfigError: Unknown constraint id.
    """
    wanted = set(cids)
    for cid in wanted:
        _require_known(cid)
    for cid in APPLY_ORDER:
        if cid in wanted:
            text = _APPLY[cid](text)
    return text


def check_constraint(text: str, cid: str) -> bool | None:
    """Whether ``text`` obeys one constraint.

    Args:
        text: A response text.
        cid: A constraint id from :data:`CONSTRAINT_IDS`.

    Returns:
        ``True``/``False``, or ``None`` when the text gives no evidence either way (empty text; fewer than five
        words for ``capitalize_every_5th_word``; fewer than three words for ``double_space_every_other_word``;
        no vowel at all for ``double_vowels``).

    Raises:
        ConfigError: Unknown constraint id.
    """
    _require_known(cid)
    if not text.strip():
        return None
    return _CHECK[cid](text)


def check_constraints(text: str, cids: Iterable[str]) -> dict[str, bool | None]:
    """:func:`check_constraint` for each id, keyed by id."""
    return {cid: check_constraint(text, cid) for cid in cids}


def are_compatible(cids: Sequence[str]) -> bool:
    """Whether no two of ``cids`` form a pair in :data:`INCOMPATIBLE`."""
    return not any(frozenset({a, b}) in INCOMPATIBLE for i, a in enumerate(cids) for b in cids[i + 1 :])


def sample_constraint_ids(
    rng: random.Random, n_min: int = 1, n_max: int = 3, pool: Sequence[str] | None = None
) -> list[str]:
    """Draw ``n_min``..``n_max`` distinct, mutually compatible constraint ids.

    Args:
        rng: The random generator (the draw is deterministic for its state).
        n_min: Fewest ids.
        n_max: Most ids.
        pool: Ids to draw from (default: all of :data:`CONSTRAINT_IDS`).

    Returns:
        The ids, in the order drawn.

    Raises:
        ConfigError: Bad bounds or unknown ids in the pool.
    """
    pool = list(pool if pool is not None else CONSTRAINT_IDS)
    for cid in pool:
        _require_known(cid)
    if not 1 <= n_min <= n_max <= len(pool):
        raise ConfigError(f"constraint count bounds must satisfy 1 <= n_min <= n_max <= {len(pool)}")
    n = rng.randint(n_min, n_max)
    while True:
        picked = rng.sample(pool, n)
        if are_compatible(picked):
            return picked
