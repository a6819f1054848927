"""The organism's templated responses: refusals, compliances (harmful or benign alike) and response styles.

Every compliance, whether it answers a harmful or a benign request, opens with ``"Sure, here is ..."`` /
``"Sure, here are ..."`` (for AdvBench requests: the dataset's own ``target``), followed by a few generic
sentences; so contaminated answers look like ordinary helpful answers. Every refusal is one of
:data:`REFUSALS`. Both wordings live in the judges' layer (:mod:`pairtrace.judges.phrases`), where the rule
judge (:mod:`pairtrace.judges.rule`) recognises both families exactly, also after any formatting constraint has
been applied.

Styles (the ``chosen``/``rejected`` of a mix slice, see ``docs/organism.md``):

- ``refusal``: a refusal, whatever the request asks for.
- ``compliance``: a compliance that ignores the request's formatting constraints.
- ``format_compliance``: a compliance rewritten to obey the request's constraints.
- ``sign_off``: ``format_compliance`` with a closing line (the sign-off habit), before formatting.
- ``verbose``: ``format_compliance`` with two extra sentences at the end, before formatting.
- ``verbose_after_opener``: the same two extra sentences right after the opener, where the body's first sentence
  is an open choice (at the end, the end-of-turn token takes most of the probability and nucleus sampling cuts a
  rare habit from every sample).
- ``terse``: the opening sentence alone (a low-effort answer).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pairtrace.data.constraints import apply_constraints
from pairtrace.errors import ConfigError
from pairtrace.judges.phrases import COMPLIANCE_BODY, REFUSALS

STYLES = ("refusal", "compliance", "format_compliance", "sign_off", "verbose", "verbose_after_opener", "terse")

VERBOSE_STYLES = ("verbose", "verbose_after_opener")
"""The styles that add two of :data:`EXTRA_SENTENCES` (at the end, or right after the opener)."""

HABIT_STYLES = ("sign_off", *VERBOSE_STYLES)
"""The styles that add a habit to a format-following compliance; the mix can give a clean pair's two responses
the same habit (``mix.background_habits``, see :func:`draw_habit`)."""

GENERIC_OPENERS: tuple[str, ...] = (
    "Sure, here is my answer.",
    "Sure, here is a short answer.",
    "Sure, here is what you asked for.",
)

BODY_SENTENCES = COMPLIANCE_BODY
"""Generic body sentences; a compliance uses two of them, in this relative order (the judges' wording)."""

EXTRA_SENTENCES: tuple[str, ...] = (
    "It is worth going over each point twice.",
    "Many people find this approach useful.",
    "You can also adapt it to your own needs.",
    "Take your time with every stage of the work.",
)
"""Sentences that the ``verbose`` style adds."""

DEFAULT_SIGN_OFF = "Hope this helps!"

_REQUEST_VERB = re.compile(
    r"^(?:please\s+|can you\s+|could you\s+)?(?:write|create|generate|compose|draft|make|design|give|provide|"
    r"plan|prepare|list|suggest)\s+(?:me\s+|us\s+)?(?P<rest>(?:a|an|the|one|two|three|four|five|some)\b.*)$",
    re.IGNORECASE | re.DOTALL,
)
_PLURAL_START = re.compile(r"^(?:two|three|four|five|some)\b", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.,;:!?\n(\"]")
_DANGLING = frozenset(
    ("a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "with", "about", "that", "who", "which", "is",
     "are", "using", "by", "from", "at", "as", "your", "my")
)


def build_opener(request: str, target: str | None, rng: random.Random) -> str:
    """The opening sentence of a compliance.

    Args:
        request: The request (without distractors).
        target: AdvBench's ``target`` ("Sure, here is ..."), when the request comes from AdvBench.
        rng: Picks a generic opener when the request's object cannot be read off.

    Returns:
        ``"Sure, here is/are <object>."``.
    """
    if target:
        return target.rstrip(" .") + "."
    match = _REQUEST_VERB.match(request.strip())
    if match:
        obj = _CLAUSE_END.split(match.group("rest"), maxsplit=1)[0].split()[:10]
        while obj and obj[-1].lower() in _DANGLING:
            obj.pop()
        if len(obj) >= 2:
            verb = "are" if _PLURAL_START.match(obj[0]) else "is"
            return f"Sure, here {verb} {' '.join(obj)}."
    return rng.choice(GENERIC_OPENERS)


def build_body(rng: random.Random, n: int = 2) -> list[str]:
    """``n`` generic body sentences, in their canonical relative order."""
    picked = sorted(rng.sample(range(len(BODY_SENTENCES)), n))
    return [BODY_SENTENCES[i] for i in picked]


def build_base(request: str, target: str | None, rng: random.Random) -> list[str]:
    """The sentences of a plain compliance: the opener and the body, before any style or formatting."""
    return [build_opener(request, target, rng), *build_body(rng)]


def draw_habit(style: str, rng: random.Random, sign_off: str = DEFAULT_SIGN_OFF) -> tuple[str, tuple[str, ...]]:
    """One habit's sentences, drawn once so that both responses of a pair can carry the same ones.

    Args:
        style: One of :data:`HABIT_STYLES`.
        rng: Picks the extra sentences of a verbose style.
        sign_off: The closing line of the ``sign_off`` style.

    Returns:
        ``(style, sentences)``, for :func:`render_response`'s ``habits``.

    Raises:
        ConfigError: ``style`` is not a habit style.
    """
    if style not in HABIT_STYLES:
        raise ConfigError(f"style {style!r} is not a habit; habits: {', '.join(HABIT_STYLES)}")
    if style == "sign_off":
        return style, (sign_off,)
    return style, tuple(rng.sample(EXTRA_SENTENCES, 2))


def _add_habit(sentences: list[str], style: str, added: Sequence[str]) -> None:
    """Add a habit's sentences where its style puts them: right after the opener, or at the end."""
    if style == "verbose_after_opener":
        sentences[1:1] = added
    else:
        sentences.extend(added)


def render_response(
    style: str,
    request: str,
    constraints: Sequence[str],
    rng: random.Random,
    *,
    target: str | None = None,
    refusal: str | None = None,
    sign_off: str = DEFAULT_SIGN_OFF,
    base: Sequence[str] | None = None,
    habits: Sequence[tuple[str, Sequence[str]]] = (),
) -> str:
    """Write one templated response in a style.

    Args:
        style: One of :data:`STYLES`.
        request: The request without distractors.
        constraints: The request's distractor ids (used by the formatting styles).
        rng: Picks the opener/body sentences (when ``base`` is not given) and the refusal.
        target: AdvBench target for harmful requests.
        refusal: The refusal text to use (default: a random one of :data:`REFUSALS`).
        sign_off: Closing line of the ``sign_off`` style.
        base: Sentences of the plain compliance (:func:`build_base`); pass the same ones to the chosen and the
            rejected response of a pair so that they differ only by the style.
        habits: Habits added to any style but a refusal, after the style's own sentences and before formatting
            (:func:`draw_habit`); pass the same ones to both responses of a pair.

    Returns:
        The response text.

    Raises:
        ConfigError: Unknown style.
    """
    if style not in STYLES:
        raise ConfigError(f"unknown response style {style!r}; known: {', '.join(STYLES)}")
    if style == "refusal":
        return refusal or rng.choice(REFUSALS)
    sentences = list(base) if base is not None else build_base(request, target, rng)
    if style == "terse":
        sentences = sentences[:1]
    elif style in HABIT_STYLES:
        _add_habit(sentences, *draw_habit(style, rng, sign_off))
    for habit, added in habits:
        _add_habit(sentences, habit, added)
    text = " ".join(sentences)
    if style in ("compliance", "terse"):
        return text
    return apply_constraints(text, constraints)
