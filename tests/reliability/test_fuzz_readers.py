"""Property tests for the pair readers: random mixes of valid and malformed records, in JSONL and Parquet.

Run with ``-s`` to see the summary: inputs tried, bad records caught cleanly, pairs lost (must be 0).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairtrace.data.layouts import CHOSEN_MODEL_KEYS, ID_KEYS, REJECTED_MODEL_KEYS, SOURCE_KEYS
from pairtrace.data.pairs import load_pairs
from pairtrace.data.types import BadRecord, PairSet
from pairtrace.errors import DataError

from .counters import record_reader_fuzz

FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STATS: Counter[str] = Counter()
"""Module-level counters, printed by the summary at the end of the module."""


@dataclass
class Item:
    """One generated record: what is written, and what reading it must give back."""

    payload: Any  # dict record, or raw bytes for a line that is not a JSON record
    valid: bool
    explicit_id: str | None = None
    prompt: tuple = ()
    chosen: str = ""
    rejected: str = ""
    meta: tuple = (None, None, None)  # source, chosen_model, rejected_model


# ------------------------------------------------------------------------------------------------ strategies

MARKERS = ("\n\nHuman:", "\n\nAssistant:")


def usable(text: str) -> bool:
    return bool(text.strip()) and not any(m in text for m in MARKERS)


PLAIN_TEXT = st.text(min_size=1, max_size=30)
PADDED_TEXT = st.tuples(st.sampled_from([" ", "  ", "\n", "\t "]), PLAIN_TEXT, st.sampled_from(["", " ", "\n\n"])).map(
    "".join
)
TEXT = st.one_of(PLAIN_TEXT, PADDED_TEXT).filter(usable)
LONG = st.integers(20_000, 120_000).map(lambda n: ("long text ✓ ünï " * (n // 16 + 1))[:n])
RESPONSE = st.one_of(TEXT, TEXT, TEXT, TEXT, LONG)
WHITESPACE = st.sampled_from(["", " ", "\n", "\t  ", "\u3000", " \r\n "])
EXTRA_VALUES = st.one_of(st.none(), st.integers(), TEXT, st.lists(st.integers(), max_size=3))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@st.composite
def turns(draw, system: bool = True) -> list[dict]:
    """A prompt conversation ending with a user turn (optionally opened by a system turn)."""
    users = draw(st.lists(TEXT, min_size=1, max_size=3))
    answers = draw(st.lists(TEXT, min_size=len(users) - 1, max_size=len(users) - 1))
    messages = [{"role": "system", "content": draw(TEXT)}] if system and draw(st.booleans()) else []
    for i, text in enumerate(users):
        messages.append(user(text))
        if i < len(answers):
            messages.append(assistant(answers[i]))
    return messages


@st.composite
def responses(draw) -> tuple[str, str]:
    chosen = draw(RESPONSE)
    rejected = chosen if draw(st.integers(0, 4)) == 0 else draw(RESPONSE)  # identical pairs are valid
    return chosen, rejected


def hh_text(messages: list[dict], response: str) -> str:
    tags = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    return "".join(tags[m["role"]] + m["content"] for m in messages) + "\n\nAssistant: " + response


@st.composite
def layout_fields(draw, layout: str) -> tuple[dict, tuple, str, str]:
    """Fields of one valid record in ``layout`` and the (prompt, chosen, rejected) it must read as."""
    chosen, rejected = draw(responses())
    if layout == "standard":
        prompt = draw(TEXT)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, (user(prompt),), chosen, rejected
    if layout == "olmo":
        prompt = draw(TEXT)
        context = [*draw(turns())[:-1], user(prompt)] if draw(st.integers(0, 3)) else []
        fields = {
            "prompt": prompt,
            "chosen": [*context, assistant(chosen)],
            "rejected": [*context, assistant(rejected)],
        }
        return fields, tuple(context) or (user(prompt),), chosen, rejected
    if layout == "hh":
        messages = draw(turns(system=False))
        fields = {"chosen": hh_text(messages, chosen), "rejected": hh_text(messages, rejected)}
        return fields, tuple(messages), chosen, rejected
    messages = draw(turns())
    if layout == "conversational":
        fields = {"prompt": messages, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}
    elif layout == "conversational_strings":
        fields = {"prompt": messages, "chosen": chosen, "rejected": rejected}
    else:  # implicit prompt: full conversations only
        fields = {"chosen": [*messages, assistant(chosen)], "rejected": [*messages, assistant(rejected)]}
    return fields, tuple(messages), chosen, rejected


LAYOUT_NAMES = ("standard", "olmo", "hh", "conversational", "conversational_strings", "implicit")


@st.composite
def valid_items(draw, layout: str | None = None, parquet: bool = False) -> Item:
    layout = layout or draw(st.sampled_from(LAYOUT_NAMES))
    fields, prompt, chosen, rejected = draw(layout_fields(layout))
    record: dict[str, Any] = {}
    explicit_id = None
    if draw(st.booleans()):
        key = "id" if parquet else draw(st.sampled_from(ID_KEYS))
        value = draw(
            st.sampled_from(["a", "b", "7", "x y", "9"])
            if parquet
            else st.one_of(st.sampled_from("abc7"), st.integers(0, 12))
        )
        record[key] = value
        explicit_id = str(value)
    record.update(fields)
    meta: list[str | None] = [None, None, None]
    for i, keys in enumerate((SOURCE_KEYS, CHOSEN_MODEL_KEYS, REJECTED_MODEL_KEYS)):
        if draw(st.booleans()):
            key = draw(st.sampled_from(keys))
            record[key] = meta[i] = draw(TEXT)
    if not parquet:
        record.update(draw(st.dictionaries(st.sampled_from(["extra", "score", "notes"]), EXTRA_VALUES, max_size=2)))
    return Item(record, True, explicit_id, prompt, chosen, rejected, tuple(meta))


CONV = [user("hi")]
NO_ROLE = {"content": "c"}
NO_CONTENT = {"role": "assistant"}


def _with_blank(build) -> st.SearchStrategy[dict]:
    return st.builds(build, WHITESPACE)


BAD_BY_LAYOUT: dict[str, list[st.SearchStrategy[dict]]] = {
    "standard": [
        st.just({"prompt": "p", "rejected": "r"}),  # missing chosen
        st.just({"prompt": "p", "chosen": "c"}),  # missing rejected
        st.just({"chosen": "c", "rejected": "r"}),  # missing prompt, not a transcript
        _with_blank(lambda w: {"prompt": "p", "chosen": w, "rejected": "r"}),
        _with_blank(lambda w: {"prompt": "p", "chosen": "c", "rejected": w}),
        _with_blank(lambda w: {"prompt": w, "chosen": "c", "rejected": "r"}),
    ],
    "hh": [
        st.just({"chosen": "\n\nHuman: q\n\nAssistant: c"}),
        st.just({"chosen": "c", "rejected": "r"}),
        _with_blank(
            lambda w: {"chosen": f"\n\nHuman: q\n\nAssistant: {w}", "rejected": "\n\nHuman: q\n\nAssistant: r"}
        ),
        st.just({"chosen": "\n\nHuman: a\n\nAssistant: c", "rejected": "\n\nHuman: b\n\nAssistant: r"}),
        st.just({"chosen": "\n\nHuman: a\n\nAssistant: c\n\nHuman: d", "rejected": "\n\nHuman: a\n\nAssistant: r"}),
    ],
    "conversational": [
        st.just({"prompt": CONV, "rejected": [assistant("r")]}),
        st.just({"prompt": CONV, "chosen": [NO_ROLE], "rejected": [assistant("r")]}),
        st.just({"prompt": CONV, "chosen": [NO_CONTENT], "rejected": [assistant("r")]}),
        st.just({"prompt": CONV, "chosen": [user("c")], "rejected": [assistant("r")]}),
        st.just({"prompt": [NO_ROLE], "chosen": [assistant("c")], "rejected": [assistant("r")]}),
        _with_blank(lambda w: {"prompt": CONV, "chosen": [assistant(w)], "rejected": [assistant("r")]}),
    ],
    "conversational_strings": [
        st.just({"prompt": CONV, "chosen": "c"}),
        _with_blank(lambda w: {"prompt": CONV, "chosen": w, "rejected": "r"}),
        _with_blank(lambda w: {"prompt": [user(w)], "chosen": "c", "rejected": "r"}),
    ],
    "implicit": [
        st.just({"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("r")]}),
        st.just({"chosen": [assistant("c")], "rejected": [assistant("r")]}),
        st.just({"chosen": [user("a"), NO_CONTENT], "rejected": [user("a"), assistant("r")]}),
        st.just({"chosen": [user("a"), user("c")], "rejected": [user("a"), assistant("r")]}),
        st.just({"chosen": [user("a"), assistant("c")]}),
    ],
    "olmo": [
        st.just({"prompt": "q", "chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")]}),
        st.just({"prompt": "p", "chosen": [user("p"), user("c")], "rejected": [user("p"), assistant("r")]}),
        st.just({"prompt": "p", "chosen": [user("p"), NO_ROLE], "rejected": [user("p"), assistant("r")]}),
        _with_blank(
            lambda w: {"prompt": "p", "chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant(w)]}
        ),
    ],
}
"""Records that must be reported as bad, written in the column types of each layout (so Parquet can store them)."""

BAD_TYPED = [
    st.builds(
        lambda v: {"prompt": "p", "chosen": v, "rejected": "r"},
        st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False), st.dictionaries(TEXT, TEXT, max_size=2)),
    ),
    st.just({"prompt": 3, "chosen": "c", "rejected": "r"}),
    st.just({"prompt": CONV, "chosen": [assistant("c")], "rejected": "r"}),
    st.just({"prompt": CONV, "chosen": ["not a message"], "rejected": [assistant("r")]}),
    st.just({"prompt": CONV, "chosen": [{"role": 1, "content": "c"}], "rejected": [assistant("r")]}),
    st.just({"prompt": CONV, "chosen": [{"role": "assistant", "content": ["c"]}], "rejected": [assistant("r")]}),
    st.just({"prompt": "p", "chosen": "c", "rejected": "r", "id": 1.5}),
    st.just({"prompt": "p", "chosen": "c", "rejected": "r", "uid": True}),
    st.just({"prompt": "p", "chosen": "c", "rejected": "r", "source": ["s"]}),
    st.just({"prompt": "p", "chosen": "c", "rejected": "r", "chosenModel": 5}),
]
"""Bad records whose field types clash with every layout (JSON Lines only)."""


RAW_BAD_LINES = st.one_of(
    st.sampled_from(
        [
            b"{",
            b'{"prompt": "p", "chosen": "c", "rejected": "r"',
            b'{"prompt": "\xe9t\xe9", "chosen": "c", "rejected": "r"}',  # latin-1 bytes: invalid UTF-8
            b"\xff\xfe\xfd",
            b"[1, 2, 3]",
            b"42",
            b"null",
            b'"a string"',
        ]
    ),
    # short random bytes can never spell a complete valid record (the shortest one is 40 bytes)
    st.binary(min_size=1, max_size=20).filter(
        lambda b: b"\n" not in b and b.strip() and not b.startswith(b"\xef\xbb\xbf")
    ),
)


def bad_items(layout: str | None = None) -> st.SearchStrategy[Item]:
    """Bad records of one layout's column types, or (``layout=None``) of any kind, raw lines included."""
    if layout is not None:
        return st.one_of(BAD_BY_LAYOUT[layout]).map(lambda d: Item(d, False))
    every = [s for strategies in BAD_BY_LAYOUT.values() for s in strategies] + BAD_TYPED
    return st.one_of(st.one_of(every).map(lambda d: Item(d, False)), RAW_BAD_LINES.map(lambda b: Item(b, False)))


@st.composite
def mixed_items(draw, layout: str | None = None) -> Item:
    """Three valid records for one bad one (``st.one_of`` would flatten the many bad kinds and favour them)."""
    if draw(st.integers(0, 3)):
        return draw(valid_items(layout, parquet=layout is not None))
    return draw(bad_items(layout))


# ---------------------------------------------------------------------------------------------------- checks


def expected_outcome(items: list[Item]) -> tuple[dict[int, tuple], set[int]]:
    """Rows that must come back as pairs (with their content) and rows that must be reported as bad."""
    good: dict[int, tuple] = {}
    bad: set[int] = set()
    seen: set[str] = set()
    for row, item in enumerate(items):
        pair_id = item.explicit_id if item.explicit_id is not None else str(row)
        if not item.valid or pair_id in seen:
            STATS["duplicate ids generated"] += item.valid
            bad.add(row)
            continue
        seen.add(pair_id)
        good[row] = (pair_id, item.prompt, item.chosen, item.rejected, *item.meta)
    return good, bad


def check_pair_set(loaded: PairSet, items: list[Item], lines: bool) -> None:
    """Counts add up, bad records are located and explained, valid records come back intact."""
    good, bad = expected_outcome(items)
    assert loaded.n_records == len(items)
    assert loaded.n_records == len(loaded.pairs) + len(loaded.skipped)
    for record in loaded.skipped:
        assert isinstance(record, BadRecord) and record.reason and 0 <= record.row < len(items)
        assert record.line == (record.row + 1 if lines else None)
    got = {p.row: (p.id, p.prompt, p.chosen, p.rejected, p.source, p.chosen_model, p.rejected_model) for p in loaded}
    lost = set(good) - set(got)
    STATS["pairs lost"] += len(lost)
    STATS["pairs read"] += len(got)
    STATS["bad records caught"] += len(loaded.skipped)
    assert not lost, f"valid records lost: rows {sorted(lost)}"
    assert got == good
    assert {b.row for b in loaded.skipped} == bad


def check_strict(path: Path, loaded: PairSet) -> None:
    """Strict mode raises DataError at the first bad record (and nothing else), or reads the same pairs."""
    try:
        strict = load_pairs(path, strict=True)
    except DataError as exc:
        STATS["strict errors caught"] += 1
        assert loaded.skipped, "strict mode raised on a file without bad records"
        assert str(loaded.skipped[0]) in str(exc)
        return
    assert not loaded.skipped
    assert strict.pairs == loaded.pairs and strict.fingerprint == loaded.fingerprint


# ------------------------------------------------------------------------------------------------------ tests


@FUZZ_SETTINGS
@given(
    items=st.lists(mixed_items(), max_size=12),
    ensure_ascii=st.booleans(),
    crlf=st.booleans(),
    compress=st.booleans(),
)
def test_fuzz_jsonl(items: list[Item], ensure_ascii: bool, crlf: bool, compress: bool) -> None:
    ending = b"\r\n" if crlf else b"\n"
    lines = [
        item.payload
        if isinstance(item.payload, bytes)
        else json.dumps(item.payload, ensure_ascii=ensure_ascii).encode()
        for item in items
    ]
    data = b"".join(line + ending for line in lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("pairs.jsonl.gz" if compress else "pairs.jsonl")
        path.write_bytes(gzip.compress(data) if compress else data)
        STATS["inputs tried"] += 1
        STATS["records tried"] += len(items)
        loaded = load_pairs(path)
        check_pair_set(loaded, items, lines=True)
        check_strict(path, loaded)


def write_parquet(path: Path, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys}), path)


@st.composite
def parquet_items(draw) -> list[Item]:
    """One layout per file (Parquet columns have one type), valid and bad records mixed."""
    layout = draw(st.sampled_from(LAYOUT_NAMES))
    return draw(st.lists(mixed_items(layout), min_size=1, max_size=10))


@FUZZ_SETTINGS
@given(items=parquet_items())
def test_fuzz_parquet(items: list[Item]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        write_parquet(path, [item.payload for item in items])
        STATS["inputs tried"] += 1
        STATS["records tried"] += len(items)
        loaded = load_pairs(path)
        check_pair_set(loaded, items, lines=False)
        check_strict(path, loaded)


@pytest.fixture(scope="module", autouse=True)
def print_summary():
    yield
    print("\nreader fuzz summary: " + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items())))
    record_reader_fuzz(STATS)  # into the reliability summary printed at the end of the session


def test_summary_no_pairs_lost() -> None:
    """Runs after the fuzz tests in this module: something was tried, and no valid record was lost."""
    if STATS["inputs tried"]:
        assert STATS["pairs lost"] == 0
        assert STATS["bad records caught"] > 0
