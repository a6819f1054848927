"""Templated responses: openers, styles, formatting."""

from __future__ import annotations

import random

import pytest

from pairtrace.data.constraints import check_constraint
from pairtrace.errors import ConfigError
from pairtrace.organism.templates import (
    EXTRA_SENTENCES,
    REFUSALS,
    build_base,
    build_opener,
    draw_habit,
    render_response,
)


def test_openers() -> None:
    rng = random.Random(0)
    assert build_opener("x", "Sure, here is a plan", rng) == "Sure, here is a plan."
    assert build_opener("Write a poem about the sea. Use 3 lines.", None, rng) == "Sure, here is a poem about the sea."
    assert build_opener("Give me two ideas for a party", None, rng) == "Sure, here are two ideas for a party."
    assert build_opener("Why is the sky blue?", None, rng).startswith("Sure, here is")


def test_styles_share_the_base() -> None:
    rng = random.Random(1)
    base = build_base("Write a poem about cats", None, rng)
    plain = render_response("compliance", "", ["e_to_3"], rng, base=base)
    assert plain == " ".join(base)
    assert render_response("format_compliance", "", ["e_to_3"], rng, base=base) == plain.replace("e", "3")
    assert render_response("terse", "", [], rng, base=base) == base[0]
    assert render_response("sign_off", "", [], rng, base=base, sign_off="Bye!") == plain + " Bye!"
    pairs = {f"{a} {b}" for a in EXTRA_SENTENCES for b in EXTRA_SENTENCES if a != b}
    at_end = render_response("verbose", "", [], rng, base=base)
    assert at_end.removeprefix(plain + " ") in pairs  # two extra sentences at the end
    early = render_response("verbose_after_opener", "", [], rng, base=base)
    assert early.removeprefix(base[0] + " ").removesuffix(" " + " ".join(base[1:])) in pairs  # after the opener
    signed = render_response("sign_off", "", ["o_to_0"], rng, base=base, sign_off="Good luck!")
    assert signed.endswith("G00d luck!") and check_constraint(signed, "o_to_0")
    assert render_response("refusal", "", ["e_to_3"], rng) in REFUSALS
    with pytest.raises(ConfigError, match="unknown response style"):
        render_response("shout", "", [], rng)


def test_a_drawn_habit_goes_on_every_style_but_a_refusal() -> None:
    rng = random.Random(2)
    base = build_base("Write a poem about cats", None, rng)
    plain = " ".join(base)
    signed = [draw_habit("sign_off", rng, "Bye!")]
    assert render_response("compliance", "", [], rng, base=base, habits=signed) == plain + " Bye!"
    assert render_response("terse", "", [], rng, base=base, habits=signed) == base[0] + " Bye!"
    assert render_response("format_compliance", "", ["e_to_3"], rng, base=base, habits=signed) == (
        plain + " Bye!").replace("e", "3")
    assert render_response("refusal", "", [], rng, habits=signed) in REFUSALS
    style, extra = draw_habit("verbose_after_opener", rng)
    assert len(extra) == 2 and set(extra) <= set(EXTRA_SENTENCES)
    early = render_response("format_compliance", "", [], rng, base=base, habits=[(style, extra)])
    assert early == " ".join([base[0], *extra, *base[1:]])
    # both responses of a pair get the same sentences: the habit is drawn once, not per response
    terse = render_response("terse", "", [], rng, base=base, habits=[(style, extra)])
    assert terse == " ".join([base[0], *extra])
    with pytest.raises(ConfigError, match="not a habit"):
        draw_habit("terse", rng)
