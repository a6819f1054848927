"""Tests for pairtrace.data (pairs, layouts, readers): readers, layouts, aliases, bad records, fingerprints, writers."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairtrace.data import layouts as layouts_module
from pairtrace.data.layouts import detect_layout, pair_from_record, pair_to_record
from pairtrace.data.pairs import compute_fingerprint, load_pairs, save_pairs_jsonl
from pairtrace.data.paths import shared_data_dir
from pairtrace.data.readers import detect_source_kind, iter_records
from pairtrace.data.types import BadRecord, Pair
from pairtrace.errors import ConfigError, DataError


def _resolve_shared_data() -> Path | None:
    try:
        return shared_data_dir()
    except ConfigError:
        return None


SHARED_DATA = _resolve_shared_data()
HH_FILE = "hh_rlhf_harmless_base_test.jsonl.gz"
HH_EMPTY_CHOSEN_ROWS = {86, 516, 925, 1103}
HH_PREFIX_MISMATCH_ROWS = {1254, 1688, 1950, 1952, 2036}


@pytest.fixture(scope="module")
def hh_path() -> Path:
    if SHARED_DATA is None:
        pytest.fail("shared data folder not found: set PAIRTRACE_SHARED_DATA")
    return SHARED_DATA / HH_FILE


@pytest.fixture(scope="module")
def hh_set(hh_path):
    return load_pairs(hh_path)


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw str/bytes lines) as JSON Lines."""
    with path.open("wb") as fh:
        for record in records:
            if isinstance(record, bytes):
                fh.write(record + b"\n")
            elif isinstance(record, str):
                fh.write(record.encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Write records as Parquet, filling absent keys with null."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys}), path)
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SIMPLE_PAIRS = [
    Pair("a1", 0, (user("How do I boil an egg?"),), "Put it in boiling water.", "No.", "web", "m-big", "m-small"),
    Pair("a2", 1, (user("Say hi ☃"),), "Hi ☃!", "Hello.", None, None, "m-small"),
    Pair("a3", 2, (user("Same?"),), "Identical answer.", "Identical answer.", "web", None, None),
    Pair("a4", 3, (user("  spaced  "),), " leading space kept", "trailing\n", None, "m-big", None),
]


# ------------------------------------------------------------------------------------------------ real HH-RLHF


def test_hh_rlhf_file_counts_and_skips(hh_set):
    assert hh_set.n_records == 2312
    assert len(hh_set.pairs) + len(hh_set.skipped) == 2312
    assert hh_set.format == "hh"
    assert len(hh_set.fingerprint) == 64
    empty = {b.row for b in hh_set.skipped if "empty" in b.reason}
    mismatch = {b.row for b in hh_set.skipped if "differs" in b.reason}
    assert empty == HH_EMPTY_CHOSEN_ROWS
    assert mismatch == HH_PREFIX_MISMATCH_ROWS
    assert len(hh_set.skipped) == len(empty) + len(mismatch)
    for bad in hh_set.skipped:
        assert bad.line == bad.row + 1
        assert bad.field == ("chosen" if bad.row in empty else "rejected")


def test_hh_rlhf_skipped_records_are_really_bad(hh_path):
    with gzip.open(hh_path, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    for row in HH_EMPTY_CHOSEN_ROWS:
        chosen = records[row]["chosen"]
        assert not chosen[chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:") :].strip()
    for row in HH_PREFIX_MISMATCH_ROWS:
        c, r = records[row]["chosen"], records[row]["rejected"]
        assert c[: c.rfind("\n\nAssistant:")] != r[: r.rfind("\n\nAssistant:")]


def test_hh_rlhf_first_pair_parsed(hh_set):
    first = hh_set[0]
    assert first.id == "0" and first.row == 0
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first.chosen.startswith("No, sorry!  All of these involve a pen")
    assert first.rejected.startswith("There are lots of funny things")
    ids = [p.id for p in hh_set]
    assert len(set(ids)) == len(ids) == 2303
    assert all(p.id == str(p.row) for p in hh_set)


# ------------------------------------------------------------------------------ same content, every format


def _write_all_formats(tmp_path: Path, pairs: list[Pair], with_standard: bool) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    layouts = ["conversational", "olmo", "hh"] + (["standard"] if with_standard else [])
    for layout in layouts:
        paths[layout] = tmp_path / f"{layout}.jsonl"
        save_pairs_jsonl(pairs, paths[layout], layout=layout)
    paths["gz"] = tmp_path / "conv.jsonl.gz"
    save_pairs_jsonl(pairs, paths["gz"], layout="conversational")
    records = [pair_to_record(p, "conversational") for p in pairs]
    paths["json_array"] = tmp_path / "array.json"
    paths["json_array"].write_text(json.dumps(records), encoding="utf-8")
    paths["parquet"] = write_parquet(tmp_path / "conv.parquet", records)
    paths["parquet_olmo"] = write_parquet(tmp_path / "olmo.parquet", [pair_to_record(p, "olmo") for p in pairs])
    paths["disk"] = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(paths["disk"]))
    # implicit-prompt TRL conversational: full conversations, no prompt column
    implicit = [
        {"id": p.id, "chosen": [*p.prompt, assistant(p.chosen)], "rejected": [*p.prompt, assistant(p.rejected)]}
        for p in pairs
    ]
    paths["implicit"] = write_jsonl(tmp_path / "implicit.jsonl", implicit)
    return paths


def _content(pair: Pair) -> tuple:
    return (pair.id, pair.prompt, pair.chosen, pair.rejected)


def _content_and_meta(pair: Pair) -> tuple:
    return (*_content(pair), pair.source, pair.chosen_model, pair.rejected_model)


def test_same_content_every_format_same_pairs(tmp_path):
    paths = _write_all_formats(tmp_path, SIMPLE_PAIRS, with_standard=True)
    expected = compute_fingerprint(SIMPLE_PAIRS)
    for name, path in paths.items():
        loaded = load_pairs(path)
        assert loaded.skipped == [], name
        assert loaded.fingerprint == expected, name
        assert [_content(p) for p in loaded] == [_content(p) for p in SIMPLE_PAIRS], name
        assert [p.row for p in loaded] == [0, 1, 2, 3], name
        if name != "implicit":  # the implicit-prompt records above carry no metadata columns
            assert loaded.pairs == SIMPLE_PAIRS, name
    assert load_pairs(paths["standard"]).format == "standard"
    assert load_pairs(paths["olmo"]).format == "olmo"
    assert load_pairs(paths["parquet"]).format == "conversational"
    assert load_pairs(paths["hh"]).format == "hh"


def test_hh_content_round_trips_through_every_layout(tmp_path, hh_set):
    subset = hh_set.pairs[:150]  # multi-turn prompts; keep it small for speed
    paths = _write_all_formats(tmp_path, subset, with_standard=False)
    expected = compute_fingerprint(subset)
    for name, path in paths.items():
        loaded = load_pairs(path)
        assert loaded.n_records == 150 and not loaded.skipped, name
        assert loaded.fingerprint == expected, name
        assert [_content_and_meta(p) for p in loaded] == [_content_and_meta(p) for p in subset], name
    with pytest.raises(DataError, match=r"pair '0' field 'prompt'.*conversational"):
        pair_to_record(subset[0], "standard")


def test_fingerprint_depends_on_content_not_metadata():
    base = compute_fingerprint(SIMPLE_PAIRS)
    renamed = [Pair(p.id, p.row + 10, p.prompt, p.chosen, p.rejected, source="other") for p in SIMPLE_PAIRS]
    assert compute_fingerprint(renamed) == base
    changed = [*SIMPLE_PAIRS[:-1], Pair("a4", 3, SIMPLE_PAIRS[-1].prompt, "different", "trailing\n")]
    assert compute_fingerprint(changed) != base
    reordered = [SIMPLE_PAIRS[1], SIMPLE_PAIRS[0], *SIMPLE_PAIRS[2:]]
    assert compute_fingerprint(reordered) != base


def test_identical_chosen_and_rejected_is_a_valid_pair(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    loaded = load_pairs(path)
    assert len(loaded) == 1 and loaded[0].chosen == loaded[0].rejected == "x"


# -------------------------------------------------------------------------------------------------- aliases


def test_column_aliases(tmp_path):
    base = {"prompt": "p", "chosen": "c", "rejected": "r"}
    records = [
        {**base, "id": "x0", "chosen_model": "A", "rejected_model": "B", "source": "S"},
        {**base, "prompt_id": "x1", "chosen-model": "A", "rejected-model": "B", "dataset": "S"},
        {**base, "uid": "x2", "chosenModel": "A", "rejectedModel": "B", "origin": "S"},
        {**base, "example_id": 3},
    ]
    loaded = load_pairs(write_jsonl(tmp_path / "alias.jsonl", records))
    assert [p.id for p in loaded] == ["x0", "x1", "x2", "3"]
    for pair in loaded.pairs[:3]:
        assert (pair.chosen_model, pair.rejected_model, pair.source) == ("A", "B", "S")
    assert (loaded[3].chosen_model, loaded[3].rejected_model, loaded[3].source) == (None, None, None)


def test_ids_from_id_column_and_row_index(tmp_path):
    records = [{"key": f"k{i}", "id": f"i{i}", "prompt": "p", "chosen": "c", "rejected": "r"} for i in range(3)]
    path = write_jsonl(tmp_path / "ids.jsonl", records)
    assert [p.id for p in load_pairs(path, id_column="key")] == ["k0", "k1", "k2"]
    assert [p.id for p in load_pairs(path)] == ["i0", "i1", "i2"]
    no_ids = write_jsonl(tmp_path / "noid.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3)
    assert [p.id for p in load_pairs(no_ids)] == ["0", "1", "2"]
    missing = load_pairs(no_ids, id_column="key")
    assert not missing.pairs
    assert {(b.field, b.reason) for b in missing.skipped} == {("key", "missing id")}


# ---------------------------------------------------------------------------------------------- bad records

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
CONV_PROMPT = [user("hi")]
BAD_LINES: list[tuple[object, str | None, str]] = [
    ('{"prompt": "p", "chosen": ', None, "not valid JSON"),
    (b'{"prompt": "p\xff\xfe", "chosen": "c", "rejected": "r"}', None, "invalid UTF-8"),
    ("[1, 2]", None, "expected a JSON object"),
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing field"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing field"),
    ({"prompt": "p", "chosen": 7, "rejected": "r"}, "chosen", "expected a string"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "expected a string or a list"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty or whitespace-only response"),
    ({"prompt": "p", "chosen": "c", "rejected": " \n\t "}, "rejected", "empty or whitespace-only response"),
    ({"prompt": "   ", "chosen": "c", "rejected": "r"}, "prompt", "whitespace-only prompt"),
    (
        {"prompt": [{"content": "x"}], "chosen": [assistant("c")], "rejected": [assistant("r")]},
        "prompt[0].role",
        "without a role",
    ),
    (
        {"prompt": CONV_PROMPT, "chosen": [{"role": "assistant"}], "rejected": [assistant("r")]},
        "chosen[0].content",
        "without content",
    ),
    ({"prompt": CONV_PROMPT, "chosen": [user("c")], "rejected": [assistant("r")]}, "chosen", "no final assistant turn"),
    (
        {"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("r")]},
        "rejected",
        "differs from 'chosen'",
    ),
    ({"chosen": [assistant("c")], "rejected": [assistant("r")]}, "chosen", "no prompt"),
    ({"prompt": CONV_PROMPT, "chosen": [assistant("c")], "rejected": "r"}, "rejected", "expected a list"),
    (
        {"prompt": "q", "chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")]},
        "prompt",
        "does not match",
    ),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant: c", "rejected": "\n\nHuman: b\n\nAssistant: r"},
        "rejected",
        "differs from 'chosen'",
    ),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant: c\n\nHuman: more", "rejected": "\n\nHuman: a\n\nAssistant: r"},
        "chosen",
        "no final assistant turn",
    ),
    (
        {"chosen": "intro\n\nHuman: a\n\nAssistant: c", "rejected": "intro\n\nHuman: a\n\nAssistant: r"},
        "chosen",
        "text before the first 'Human:'",
    ),
    ({**GOOD, "id": 1.5}, "id", "expected a string or integer id"),
    ({**GOOD, "chosen_model": ["x"]}, "chosen_model", "expected a string"),
    ('{"prompt": "p", "chosen": "\\ud800", "rejected": "r"}', "chosen", "unpaired surrogate"),
]


def test_each_bad_record_reported_with_line_and_field(tmp_path):
    lines: list[object] = []
    expected: list[tuple[int, int, str | None, str]] = []
    for record, field_name, reason in BAD_LINES:
        lines.append({**GOOD, "id": f"good{len(lines)}"})
        lines.append("")  # a blank line: not a record, but it still counts for line numbers
        lines.append(record)
        expected.append((len(expected) * 2 + 1, len(lines), field_name, reason))
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    loaded = load_pairs(path)
    assert loaded.n_records == 2 * len(BAD_LINES)
    assert len(loaded.pairs) + len(loaded.skipped) == loaded.n_records
    assert [p.id for p in loaded] == [f"good{3 * i}" for i in range(len(BAD_LINES))]
    assert len(loaded.skipped) == len(expected)
    for bad, (row, line, field_name, reason) in zip(loaded.skipped, expected, strict=True):
        assert (bad.row, bad.line, bad.field) == (row, line, field_name), bad
        assert reason in bad.reason, bad


def test_duplicate_ids_keep_the_first(tmp_path):
    records = [{**GOOD, "id": "x", "chosen": "first"}, {**GOOD, "id": "y"}, {**GOOD, "id": "x", "chosen": "2nd"}]
    loaded = load_pairs(write_jsonl(tmp_path / "dup.jsonl", records))
    assert [(p.id, p.chosen) for p in loaded] == [("x", "first"), ("y", "c")]
    assert loaded.skipped == [BadRecord(2, 3, "id", "duplicate id 'x' (first used by row 0)")]
    # row-index ids collide with explicit ids the same way
    mixed = load_pairs(write_jsonl(tmp_path / "dup2.jsonl", [{**GOOD, "id": "1"}, GOOD]))
    assert [p.id for p in mixed] == ["1"] and mixed.skipped[0].field == "id"


def test_strict_mode_raises_naming_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "strict.jsonl", [GOOD, {"prompt": "p", "chosen": " ", "rejected": "r"}, "{"])
    with pytest.raises(DataError, match=r"line 2 field 'chosen': empty or whitespace-only response"):
        load_pairs(path, strict=True)
    assert len(load_pairs(path).skipped) == 2


def test_bad_records_in_parquet_have_rows_and_no_lines(tmp_path):
    records = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": None, "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": "  "},
    ]
    loaded = load_pairs(write_parquet(tmp_path / "bad.parquet", records))
    assert loaded.n_records == 3 and len(loaded) == 1
    assert [(b.row, b.line, b.field) for b in loaded.skipped] == [(1, None, "chosen"), (2, None, "rejected")]
    with pytest.raises(DataError, match=r"row 1 field 'chosen': missing field"):
        load_pairs(tmp_path / "bad.parquet", strict=True)


def test_skip_summary_is_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "log.jsonl", [GOOD, "nope", "nope", "nope", "nope"])
    with caplog.at_level(logging.WARNING, logger="pairtrace.data.pairs"):
        load_pairs(path)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "skipped 4 of 5 record(s)" in messages[0] and all(f"line {n}" in messages[0] for n in range(2, 6))


# ----------------------------------------------------------------------------------------- layouts, forcing


def test_detect_layout():
    assert detect_layout(GOOD) == "standard"
    assert detect_layout({"prompt": CONV_PROMPT, "chosen": [assistant("c")], "rejected": [assistant("r")]}) == (
        "conversational"
    )
    assert detect_layout({"chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")]}) == (
        "conversational"
    )
    assert detect_layout({"prompt": "p", "chosen": [assistant("c")], "rejected": [assistant("r")]}) == "olmo"
    assert detect_layout({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_layout({"chosen": "c"}) is None


def test_forced_format(tmp_path):
    conv = {"prompt": CONV_PROMPT, "chosen": [assistant("c")], "rejected": [assistant("r")]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, conv])
    auto = load_pairs(path)
    assert len(auto) == 2 and auto.format == "mixed"
    assert auto[0].prompt == (user("p"),) and auto[1].prompt == (user("hi"),)
    forced = load_pairs(path, format="standard")
    assert len(forced) == 1 and forced.format == "standard"
    assert forced.skipped[0].field == "prompt" and "layout 'standard'" in forced.skipped[0].reason
    with pytest.raises(ConfigError, match="unknown format"):
        load_pairs(path, format="csv")


def test_olmo_layout_with_system_turn_and_bare_assistant_lists():
    record = {
        "prompt": "Question?",
        "chosen": [{"role": "system", "content": "Be nice."}, user("Question?"), assistant("Yes.")],
        "rejected": [{"role": "system", "content": "Be nice."}, user("Question?"), assistant("No.")],
        "chosen_model": "big",
    }
    pair = pair_from_record(record, 5)
    assert isinstance(pair, Pair)
    assert pair.prompt == ({"role": "system", "content": "Be nice."}, user("Question?"))
    assert (pair.id, pair.chosen, pair.rejected, pair.chosen_model) == ("5", "Yes.", "No.", "big")
    bare = pair_from_record({"prompt": "Q", "chosen": [assistant("a")], "rejected": [assistant("b")]}, 0)
    assert isinstance(bare, Pair) and bare.prompt == (user("Q"),)


def test_conversational_prompt_with_string_responses_and_extra_message_keys():
    record = {"prompt": [{**user("hi"), "name": None}], "chosen": "c", "rejected": "r", "extra": [1, 2]}
    pair = pair_from_record(record, 0, 1)
    assert isinstance(pair, Pair) and pair.prompt == (user("hi"),) and (pair.chosen, pair.rejected) == ("c", "r")


def test_pair_from_record_non_dict_and_bad_layout():
    bad = pair_from_record(["x"], 4, 9)  # type: ignore[arg-type]
    assert isinstance(bad, BadRecord) and (bad.row, bad.line) == (4, 9)
    with pytest.raises(ConfigError):
        pair_from_record(GOOD, 0, layout="nope")


# -------------------------------------------------------------------------------------------- sources, I/O


def test_detect_source_kind(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    as_json_lines = write_jsonl(tmp_path / "b.json", [GOOD, GOOD])
    array = tmp_path / "c.json"
    array.write_text(json.dumps([GOOD]), encoding="utf-8")
    assert detect_source_kind(jsonl) == "jsonl"
    assert detect_source_kind(as_json_lines) == "jsonl"
    assert detect_source_kind(array) == "json"
    assert detect_source_kind(write_parquet(tmp_path / "d.parquet", [GOOD])) == "parquet"
    assert detect_source_kind("allenai/olmo-2-1124-7b-preference-mix") == "hub"
    with pytest.raises(DataError, match="no such file"):
        detect_source_kind(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="not a dataset saved"):
        detect_source_kind(tmp_path)
    assert [p.id for p in load_pairs(as_json_lines)] == ["0", "1"]


def test_json_array_bad_items_and_bad_top_level(tmp_path):
    array = tmp_path / "arr.json"
    array.write_text(json.dumps([GOOD, 5, {"prompt": "p"}]), encoding="utf-8")
    loaded = load_pairs(array)
    assert loaded.n_records == 3 and len(loaded) == 1
    assert [(b.row, b.line, b.field) for b in loaded.skipped] == [(1, None, None), (2, None, "chosen")]
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_pairs(broken)


def test_limit_and_iter_records(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{**GOOD, "id": f"r{i}"} for i in range(10)] + ["{bad"])
    assert load_pairs(path, limit=4).n_records == 4
    raws = list(iter_records(path))
    assert [r.row for r in raws] == list(range(11))
    assert [r.line for r in raws] == list(range(1, 12))
    assert raws[0].data == {**GOOD, "id": "r0"} and raws[0].bad is None
    assert raws[-1].data is None and raws[-1].bad is not None and raws[-1].bad.line == 11


def test_saved_dataset_split_selection(tmp_path):
    train = datasets.Dataset.from_list([{**GOOD, "id": "t"}])
    test = datasets.Dataset.from_list([{**GOOD, "id": "e1"}, {**GOOD, "id": "e2"}])
    both = tmp_path / "both"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(both))
    assert [p.id for p in load_pairs(both)] == ["t"]
    assert [p.id for p in load_pairs(both, split="test")] == ["e1", "e2"]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_pairs(both, split="dev")
    only_test = tmp_path / "only_test"
    datasets.DatasetDict({"test": test}).save_to_disk(str(only_test))
    assert len(load_pairs(only_test)) == 2
    single = tmp_path / "single"
    test.save_to_disk(str(single))
    assert detect_source_kind(single) == "disk" and len(load_pairs(single)) == 2


def test_hub_path_requires_revision_or_warns(monkeypatch):
    calls = []

    def fake_load_dataset(name, revision=None, split=None):
        calls.append((name, revision, split))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_pairs("org/prefs", revision="abc123")
    assert len(loaded) == 1 and loaded.origin == "org/prefs"
    assert calls == [("org/prefs", "abc123", None)]
    with pytest.warns(UserWarning, match="not be reproducible"):
        load_pairs("org/prefs")


def test_unreadable_gzip_raises_data_error(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read file"):
        load_pairs(path)


# ------------------------------------------------------------------------------------------------- writers


def test_pair_to_record_layouts():
    pair = SIMPLE_PAIRS[0]
    standard = pair_to_record(pair)
    assert standard == {
        "id": "a1",
        "prompt": "How do I boil an egg?",
        "chosen": "Put it in boiling water.",
        "rejected": "No.",
        "source": "web",
        "chosen_model": "m-big",
        "rejected_model": "m-small",
    }
    conv = pair_to_record(pair, "conversational")
    assert conv["prompt"] == [user("How do I boil an egg?")] and conv["chosen"] == [assistant(pair.chosen)]
    olmo = pair_to_record(pair, "olmo")
    assert olmo["prompt"] == "How do I boil an egg?" and olmo["rejected"][-1] == assistant("No.")
    hh = pair_to_record(pair, "hh")
    assert hh["chosen"] == "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
    with pytest.raises(ConfigError):
        pair_to_record(pair, "csv")
    system = Pair("s", 0, ({"role": "system", "content": "x"}, user("q")), "a", "b")
    with pytest.raises(DataError, match=r"pair 's' field 'prompt\[0\]\.role'"):
        pair_to_record(system, "hh")
    marker = Pair("m", 0, (user("q"),), "a\n\nHuman: sneaky", "b")
    with pytest.raises(DataError, match="HH turn marker"):
        pair_to_record(marker, "hh")


def test_save_pairs_jsonl_failure_leaves_no_file(tmp_path):
    multi = Pair("m", 0, (user("a"), assistant("b"), user("c")), "d", "e")
    target = tmp_path / "out.jsonl"
    with pytest.raises(DataError):
        save_pairs_jsonl([SIMPLE_PAIRS[0], multi], target)
    assert not target.exists() and not list(tmp_path.iterdir())
    assert save_pairs_jsonl([SIMPLE_PAIRS[0], multi], target, layout="conversational") == 2
    assert load_pairs(target).pairs == [SIMPLE_PAIRS[0], Pair("m", 1, multi.prompt, "d", "e")]


def test_module_exports_layout_names():
    assert layouts_module.LAYOUTS == ("standard", "conversational", "olmo", "hh")
