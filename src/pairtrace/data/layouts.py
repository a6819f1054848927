"""The four record layouts of a preference pair: a decoded record read as a :class:`~pairtrace.data.types.Pair`
(or a :class:`~pairtrace.data.types.BadRecord` naming the field and the reason), and a pair written back as a record.

- ``standard`` (TRL): ``prompt``, ``chosen`` and ``rejected`` are strings.
- ``conversational`` (TRL): ``chosen``/``rejected`` are message lists; ``prompt`` is an optional message list
  (when absent, the prompt is every turn before the final assistant turn, shared by both conversations).
  A message-list ``prompt`` with string responses is read the same way.
- ``olmo`` (OLMo 2 preference mix): string ``prompt`` with full-conversation ``chosen``/``rejected`` lists whose
  last turn is the assistant's.
- ``hh`` (Anthropic HH-RLHF): ``chosen``/``rejected`` are ``"\\n\\nHuman: … \\n\\nAssistant: …"`` transcripts;
  everything up to and including the last ``"\\n\\nAssistant:"`` is the (shared) prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pairtrace.data.readers import type_name
from pairtrace.data.types import BadRecord, Message, Pair
from pairtrace.errors import ConfigError, DataError

LAYOUTS = ("standard", "conversational", "olmo", "hh")
"""Record layouts :func:`load_pairs` understands (``format`` may also be ``"auto"``)."""


ID_KEYS = ("id", "prompt_id", "uid", "example_id")
SOURCE_KEYS = ("source", "dataset", "origin")
CHOSEN_MODEL_KEYS = ("chosen_model", "chosen-model", "chosenModel")
REJECTED_MODEL_KEYS = ("rejected_model", "rejected-model", "rejectedModel")

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class _Bad(Exception):
    """Internal signal: the record being parsed is bad in ``field_name`` for ``reason``."""

    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field_name = field_name
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# Interpreting one record
# --------------------------------------------------------------------------------------------------------------


def _get(record: dict[str, Any], key: str) -> Any:
    """Value of ``key``; a missing key and a null value both read as ``None`` (Parquet fills gaps with null)."""
    return record.get(key)


def detect_layout(record: dict[str, Any]) -> str | None:
    """Guess the layout of one record from the types of its fields.

    Args:
        record: A decoded record.

    Returns:
        ``"standard"``, ``"conversational"``, ``"olmo"`` or ``"hh"``, or ``None`` if no layout fits.
    """
    try:
        return _detect_layout(record)
    except _Bad:
        return None


def _detect_layout(record: dict[str, Any]) -> str:
    """Layout of a record, or :class:`_Bad` naming the field that rules every layout out."""
    prompt, chosen, rejected = _get(record, "prompt"), _get(record, "chosen"), _get(record, "rejected")
    if chosen is None:
        raise _Bad("chosen", "missing field")
    if rejected is None:
        raise _Bad("rejected", "missing field")
    if isinstance(prompt, str):
        return "olmo" if isinstance(chosen, list) else "standard"
    if isinstance(prompt, list):
        return "conversational"
    if prompt is None:
        if isinstance(chosen, list):
            return "conversational"
        if isinstance(chosen, str):
            if HH_ASSISTANT not in chosen:
                raise _Bad("prompt", "missing field (and 'chosen' is not an HH-RLHF transcript)")
            return "hh"
        raise _Bad("chosen", f"expected a string or a list of messages, got {type_name(chosen)}")
    raise _Bad("prompt", f"expected a string or a list of messages, got {type_name(prompt)}")


def _require_str(record: dict[str, Any], key: str) -> str:
    """A string field, or :class:`_Bad`."""
    value = _get(record, key)
    if value is None:
        raise _Bad(key, "missing field")
    if not isinstance(value, str):
        raise _Bad(key, f"expected a string, got {type_name(value)}")
    return value


def _require_list(record: dict[str, Any], key: str) -> list[Any]:
    """A list field, or :class:`_Bad`."""
    value = _get(record, key)
    if value is None:
        raise _Bad(key, "missing field")
    if not isinstance(value, list):
        raise _Bad(key, f"expected a list of messages, got {type_name(value)}")
    return value


def _check_response(text: str, key: str) -> str:
    """Refuse an empty or whitespace-only response."""
    if not text.strip():
        raise _Bad(key, "empty or whitespace-only response")
    return text


def _parse_messages(value: list[Any], key: str) -> list[Message]:
    """Normalise a message list to ``{"role", "content"}`` dicts, or :class:`_Bad` naming the message."""
    messages: list[Message] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _Bad(where, f"expected a message object, got {type_name(item)}")
        role, content = item.get("role"), item.get("content")
        if role is None:
            raise _Bad(f"{where}.role", "message without a role")
        if not isinstance(role, str) or not role.strip():
            raise _Bad(f"{where}.role", f"expected a non-empty string role, got {type_name(role)} {role!r}")
        if content is None:
            raise _Bad(f"{where}.content", "message without content")
        if not isinstance(content, str):
            raise _Bad(f"{where}.content", f"expected string content, got {type_name(content)}")
        messages.append({"role": role, "content": content})
    return messages


def _split_final_assistant(messages: list[Message], key: str) -> tuple[list[Message], str]:
    """Split a conversation into (turns before the final assistant turn, final assistant text)."""
    if not messages:
        raise _Bad(key, "empty conversation")
    last = messages[-1]
    if last["role"] != "assistant":
        raise _Bad(key, f"no final assistant turn (the last turn has role '{last['role']}')")
    return messages[:-1], _check_response(last["content"], key)


def _check_same_prefix(chosen_prefix: list[Message], rejected_prefix: list[Message]) -> None:
    """Chosen and rejected must answer the same conversation."""
    if chosen_prefix == rejected_prefix:
        return
    n_common = min(len(chosen_prefix), len(rejected_prefix))
    turn = next((i for i in range(n_common) if chosen_prefix[i] != rejected_prefix[i]), n_common)
    raise _Bad(
        "rejected",
        f"conversation before the final assistant turn differs from 'chosen' (from turn {turn}: "
        f"{len(chosen_prefix)} vs {len(rejected_prefix)} turns)",
    )


def _parse_standard(record: dict[str, Any]) -> tuple[list[Message], str, str, str]:
    """Prompt, chosen, rejected of a TRL standard record (and the field that holds the prompt)."""
    prompt = _require_str(record, "prompt")
    chosen = _check_response(_require_str(record, "chosen"), "chosen")
    rejected = _check_response(_require_str(record, "rejected"), "rejected")
    return [{"role": "user", "content": prompt}], chosen, rejected, "prompt"


def _parse_conversational(record: dict[str, Any]) -> tuple[list[Message], str, str, str]:
    """Prompt, chosen, rejected of a TRL conversational record (explicit or implicit prompt)."""
    raw_prompt = _get(record, "prompt")
    if raw_prompt is not None and not isinstance(raw_prompt, list):
        raise _Bad("prompt", f"expected a list of messages, got {type_name(raw_prompt)}")
    prompt = _parse_messages(raw_prompt, "prompt") if raw_prompt is not None else []
    raw_chosen = _get(record, "chosen")
    if raw_prompt is not None and isinstance(raw_chosen, str):
        # message-list prompt with plain string responses
        chosen = _check_response(raw_chosen, "chosen")
        rejected = _check_response(_require_str(record, "rejected"), "rejected")
        return prompt, chosen, rejected, "prompt"
    chosen_prefix, chosen = _split_final_assistant(
        prompt + _parse_messages(_require_list(record, "chosen"), "chosen"), "chosen"
    )
    rejected_prefix, rejected = _split_final_assistant(
        prompt + _parse_messages(_require_list(record, "rejected"), "rejected"), "rejected"
    )
    _check_same_prefix(chosen_prefix, rejected_prefix)
    return chosen_prefix, chosen, rejected, "prompt" if raw_prompt is not None else "chosen"


def _parse_olmo(record: dict[str, Any]) -> tuple[list[Message], str, str, str]:
    """Prompt, chosen, rejected of an OLMo 2 preference-mix record."""
    prompt_text = _require_str(record, "prompt")
    chosen_prefix, chosen = _split_final_assistant(_parse_messages(_require_list(record, "chosen"), "chosen"), "chosen")
    rejected_prefix, rejected = _split_final_assistant(
        _parse_messages(_require_list(record, "rejected"), "rejected"), "rejected"
    )
    _check_same_prefix(chosen_prefix, rejected_prefix)
    if not chosen_prefix:
        return [{"role": "user", "content": prompt_text}], chosen, rejected, "prompt"
    user_turns = [m["content"] for m in chosen_prefix if m["role"] == "user"]
    if not user_turns or user_turns[-1].strip() != prompt_text.strip():
        raise _Bad("prompt", "does not match the last user turn of the 'chosen' conversation")
    return chosen_prefix, chosen, rejected, "prompt"


def _split_hh(text: str, key: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt part before the last Assistant tag, response)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Bad(key, "no '\\n\\nAssistant:' turn (expected an HH-RLHF transcript, or give a 'prompt' field)")
    response = text[cut + len(HH_ASSISTANT) :].removeprefix(" ")
    if HH_HUMAN in response:
        raise _Bad(key, "no final assistant turn (the transcript ends with a Human turn)")
    return text[:cut], _check_response(response, key)


def _parse_hh_turns(text: str, key: str) -> list[Message]:
    """Messages of the prompt part of an HH-RLHF transcript."""
    marks = list(_HH_TURN.finditer(text))
    head = text[: marks[0].start()] if marks else text
    if head:
        raise _Bad(key, "text before the first 'Human:' turn of the transcript")
    messages: list[Message] = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[mark.end() : end].removeprefix(" ")
        messages.append({"role": _HH_ROLES[mark.group(1)], "content": content})
    return messages


def _parse_hh(record: dict[str, Any]) -> tuple[list[Message], str, str, str]:
    """Prompt, chosen, rejected of an HH-RLHF record."""
    chosen_head, chosen = _split_hh(_require_str(record, "chosen"), "chosen")
    rejected_head, rejected = _split_hh(_require_str(record, "rejected"), "rejected")
    if chosen_head != rejected_head:
        raise _Bad("rejected", "transcript before the last Assistant turn differs from 'chosen'")
    return _parse_hh_turns(chosen_head, "chosen"), chosen, rejected, "chosen"


_PARSERS = {
    "standard": _parse_standard,
    "conversational": _parse_conversational,
    "olmo": _parse_olmo,
    "hh": _parse_hh,
}


def _first_value(record: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    """The first alias present with a non-null value, as (key, value)."""
    for key in keys:
        value = _get(record, key)
        if value is not None:
            return key, value
    return None, None


def _extract_id(record: dict[str, Any], row: int, id_column: str | None) -> str:
    """The record's id as a string (the row index when no id column is present)."""
    if id_column is not None:
        key, value = id_column, _get(record, id_column)
        if value is None:
            raise _Bad(id_column, "missing id")
    else:
        key, value = _first_value(record, ID_KEYS)
        if key is None:
            return str(row)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(key, f"expected a string or integer id, got {type_name(value)}")
    text = str(value)
    if not text.strip():
        raise _Bad(key, "empty id")
    return text


def _extract_meta(record: dict[str, Any], keys: Sequence[str]) -> str | None:
    """An optional string metadata field under any of its aliases."""
    key, value = _first_value(record, keys)
    if key is None:
        return None
    if not isinstance(value, str):
        raise _Bad(key, f"expected a string, got {type_name(value)}")
    return value


def _check_unicode(text: str, key: str) -> None:
    """Refuse strings that cannot be written as UTF-8 (unpaired surrogates from ``\\ud800`` escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Bad(key, f"text is not valid Unicode (unpaired surrogate at position {exc.start})") from None


def _check_pair_text(pair: Pair, prompt_key: str) -> None:
    """Every string of a pair must be valid Unicode, and the prompt must hold some text."""
    for i, message in enumerate(pair.prompt):
        _check_unicode(message["role"], f"{prompt_key}[{i}].role")
        _check_unicode(message["content"], f"{prompt_key}[{i}].content")
    if not pair.prompt:
        raise _Bad(prompt_key, "no prompt: nothing precedes the final assistant turn")
    if not any(m["content"].strip() for m in pair.prompt):
        raise _Bad(prompt_key, "empty or whitespace-only prompt")
    named = (("chosen", pair.chosen), ("rejected", pair.rejected), ("id", pair.id))
    meta = (("source", pair.source), ("chosen_model", pair.chosen_model), ("rejected_model", pair.rejected_model))
    for key, text in (*named, *meta):
        if text is not None:
            _check_unicode(text, key)


def parse_record(
    record: Any, row: int, line: int | None, layout: str, id_column: str | None
) -> tuple[Pair | BadRecord, str | None]:
    """Pair (or bad record) and the layout it was read with."""
    if not isinstance(record, dict):
        return BadRecord(row, line, None, f"expected an object, got {type_name(record)}"), None
    used: str | None = None
    try:
        used = _detect_layout(record) if layout == "auto" else layout
        prompt, chosen, rejected, prompt_key = _PARSERS[used](record)
        pair = Pair(
            id=_extract_id(record, row, id_column),
            row=row,
            prompt=tuple(prompt),
            chosen=chosen,
            rejected=rejected,
            source=_extract_meta(record, SOURCE_KEYS),
            chosen_model=_extract_meta(record, CHOSEN_MODEL_KEYS),
            rejected_model=_extract_meta(record, REJECTED_MODEL_KEYS),
        )
        _check_pair_text(pair, prompt_key)
    except _Bad as bad:
        reason = bad.reason if layout == "auto" else f"{bad.reason} (layout '{layout}')"
        return BadRecord(row, line, bad.field_name, reason), used
    return pair, used


def check_layout_name(layout: str) -> None:
    """Refuse an unknown layout name."""
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(f"unknown format '{layout}' (choose auto, {', '.join(LAYOUTS)})")


def pair_from_record(
    record: dict[str, Any],
    row: int,
    line: int | None = None,
    *,
    layout: str = "auto",
    id_column: str | None = None,
) -> Pair | BadRecord:
    """Interpret one decoded record as a preference pair.

    Args:
        record: The decoded record (a dict; anything else is a bad record).
        row: Zero-based index of the record in its input (the id when the record has none).
        line: One-based line number in a JSON Lines file, if any.
        layout: ``"auto"`` to detect per record, or one of :data:`LAYOUTS` to force it.
        id_column: Column holding the id; by default the first of ``id``, ``prompt_id``, ``uid``, ``example_id``.

    Returns:
        The normalised :class:`Pair`, or a :class:`BadRecord` naming the field and the reason.

    Raises:
        ConfigError: If ``layout`` is not a known layout.
    """
    check_layout_name(layout)
    return parse_record(record, row, line, layout, id_column)[0]


# --------------------------------------------------------------------------------------------------------------
# Writing pairs back
# --------------------------------------------------------------------------------------------------------------


def _metadata(pair: Pair) -> dict[str, Any]:
    """The metadata columns written with every layout."""
    return {"source": pair.source, "chosen_model": pair.chosen_model, "rejected_model": pair.rejected_model}


def _format_hh(pair: Pair) -> tuple[str, str]:
    """HH-RLHF transcripts (chosen, rejected) for a pair, or :class:`DataError` if it cannot be one."""
    tags = {"user": HH_HUMAN, "assistant": HH_ASSISTANT}
    texts = [*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected]
    if any(HH_HUMAN in t or HH_ASSISTANT in t for t in texts):
        raise DataError(f"pair '{pair.id}' field 'prompt': text contains an HH turn marker")
    parts = []
    for i, message in enumerate(pair.prompt):
        if message["role"] not in tags:
            raise DataError(f"pair '{pair.id}' field 'prompt[{i}].role': role '{message['role']}' has no HH-RLHF form")
        parts.append(f"{tags[message['role']]} {message['content']}")
    head = "".join(parts) + HH_ASSISTANT + " "
    return head + pair.chosen, head + pair.rejected


def pair_to_record(pair: Pair, layout: str = "standard") -> dict[str, Any]:
    """Write one pair as a record of the given layout (the inverse of :func:`pair_from_record`).

    Args:
        pair: The pair.
        layout: ``"standard"`` (string prompt; single-user-turn prompts only), ``"conversational"`` (TRL
            explicit-prompt message lists), ``"olmo"`` (string prompt plus full conversations) or ``"hh"``.

    Returns:
        A JSON-serialisable dict with ``id``, the layout's fields, ``source``, ``chosen_model`` and
        ``rejected_model``.

    Raises:
        DataError: If the pair cannot be expressed in that layout (the message names the pair and the field).
        ConfigError: If ``layout`` is unknown.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout '{layout}' (choose {', '.join(LAYOUTS)})")
    prompt = [dict(m) for m in pair.prompt]
    if layout == "standard":
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise DataError(
                f"pair '{pair.id}' field 'prompt': a {len(prompt)}-turn prompt cannot be written as a string "
                "(use the 'conversational' layout)"
            )
        fields: dict[str, Any] = {"prompt": prompt[0]["content"], "chosen": pair.chosen, "rejected": pair.rejected}
    elif layout == "conversational":
        fields = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
    elif layout == "olmo":
        user_turns = [m["content"] for m in prompt if m["role"] == "user"]
        if not user_turns:
            raise DataError(f"pair '{pair.id}' field 'prompt': no user turn to use as the OLMo prompt string")
        fields = {
            "prompt": user_turns[-1],
            "chosen": [*prompt, {"role": "assistant", "content": pair.chosen}],
            "rejected": [*(dict(m) for m in prompt), {"role": "assistant", "content": pair.rejected}],
        }
    else:
        chosen, rejected = _format_hh(pair)
        fields = {"chosen": chosen, "rejected": rejected}
    return {"id": pair.id, **fields, **_metadata(pair)}


