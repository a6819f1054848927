"""Discovery's similarity matrix: its rows (one behaviour vector per prompt that M0 and M1 answer differently) and
its columns (the pairs, or the union of each prompt's top-K), and the cosines between them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairtrace.attribute import unit_rows
from pairtrace.errors import DataError
from pairtrace.pooling import ResponsePooling, mean_of_responses
from pairtrace.records import iter_jsonl

logger = logging.getLogger(__name__)

_REQUIRED_GENERATION_FIELDS = ("id", "prompt", "response")

# ----------------------------------------------------------------------------------------------- generations


@dataclass
class PromptResponses:
    """The M0 and M1 responses to one prompt.

    Attributes:
        id: Prompt record id.
        prompt: The prompt text (one user turn).
        m0: M0's responses, in sample order.
        m1: M1's responses, in sample order.
        record: The prompt fields of the first generation record (``set``, ``condition``, ...).
    """

    id: str
    prompt: str
    m0: list[str]
    m1: list[str]
    record: dict[str, Any] = field(default_factory=dict)


def load_generation_records(path: str | Path) -> list[dict[str, Any]]:
    """Read generation records (JSONL) and check the fields discovery needs.

    Raises:
        DataError: A missing file, a line that is not a JSON object, or a missing/mistyped field (the message
            names the line and the field).
    """
    records = []
    for line_no, record in iter_jsonl(path):
        for name in _REQUIRED_GENERATION_FIELDS:
            if not isinstance(record.get(name), str):
                raise DataError(f"{path} line {line_no} (id {record.get('id')!r}): field '{name}' is missing "
                                "or not a string")
        records.append(record)
    return records


def _normalise(text: str) -> str:
    return " ".join(text.split())


def select_differing_prompts(m0_records: Sequence[dict[str, Any]],
                             m1_records: Sequence[dict[str, Any]]) -> tuple[list[PromptResponses], dict[str, int]]:
    """Prompts answered by both models whose M0 and M1 responses differ.

    Two prompts' response sets are compared after whitespace normalisation; a prompt where M1 said exactly what
    M0 said (as a set of texts) carries no behaviour difference and is dropped.

    Args:
        m0_records: M0 generation records.
        m1_records: M1 generation records.

    Returns:
        ``(kept prompts in M1 file order, counts)`` with counts ``n_prompts`` (answered by both), ``n_same``,
        ``n_only_m0``, ``n_only_m1``, ``n_kept``.
    """
    def group(records) -> dict[str, PromptResponses]:
        out: dict[str, PromptResponses] = {}
        for rec in records:
            fields = {k: v for k, v in rec.items() if k != "response"}
            item = out.setdefault(rec["id"], PromptResponses(rec["id"], rec["prompt"], [], [], fields))
            if item.prompt != rec["prompt"]:
                raise DataError(f"generation records for id {rec['id']!r} disagree on field 'prompt'")
            item.m1.append(rec["response"])  # collected here, assigned to m0 or m1 below
        return out

    m0, m1 = group(m0_records), group(m1_records)
    kept, same = [], 0
    for pid, item in m1.items():
        if pid not in m0:
            continue
        if m0[pid].prompt != item.prompt:
            raise DataError(f"M0 and M1 generation records for id {pid!r} have different 'prompt' fields")
        item.m0 = list(m0[pid].m1)
        if {_normalise(t) for t in item.m0} == {_normalise(t) for t in item.m1}:
            same += 1
            continue
        kept.append(item)
    both = sum(1 for pid in m1 if pid in m0)
    counts = {"n_prompts": both, "n_same": same, "n_only_m0": sum(1 for pid in m0 if pid not in m1),
              "n_only_m1": len(m1) - both, "n_kept": len(kept)}
    return kept, counts


def compute_prompt_behaviour_vectors(loaded, prompts: Sequence[PromptResponses], layer: int, *,
                                     batch_tokens: int | None = 16384, max_length: int = 2048,
                                     progress: bool = True, response_tokens: int | None = None,
                                     pooling: ResponsePooling | None = None) -> torch.Tensor:
    """One behaviour vector per prompt (Def. 3.1): mean M1-response activation − mean M0-response activation.

    Every response is teacher-forced through ``loaded`` (M0); identical (prompt, response) texts are run once
    and weighted by their count; a response with no tokens is left out of its side's mean (a side with no
    usable response gives a NaN vector, which :func:`run_discover` drops).

    Args:
        loaded: M0.
        prompts: Prompts with their M0 and M1 responses.
        layer: Layer k.
        batch_tokens: Token budget per forward pass (``None``: the device's default).
        max_length: Maximum tokens per sequence.
        progress: Show a progress bar.
        response_tokens: Average each response's first this many tokens only (``None``: all); the datapoint
            store's setting, so that both kinds of vector live in one space.
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        ``[P, d]`` float32 behaviour vectors.
    """
    from pairtrace.activations import compute_response_means

    unique: dict[tuple[str, str], int] = {}
    for item in prompts:
        for text in (*item.m0, *item.m1):
            unique.setdefault((item.prompt, text), len(unique))
    keys = list(unique)
    means = compute_response_means(loaded, [k[0] for k in keys], [k[1] for k in keys], [layer],
                                   batch_tokens=batch_tokens, max_length=max_length, progress=progress,
                                   desc="behaviour responses",
                                   pooling=ResponsePooling.resolve(pooling, response_tokens))[:, 0]  # [u, d]
    out = torch.empty(len(prompts), means.shape[1], dtype=torch.float32)  # [P, d]
    for i, item in enumerate(prompts):
        # a response without tokens has no mean: it is left out, not allowed to poison the prompt
        m1 = mean_of_responses(means[[unique[(item.prompt, t)] for t in item.m1]])  # [d]
        m0 = mean_of_responses(means[[unique[(item.prompt, t)] for t in item.m0]])  # [d]
        out[i] = m1 - m0
    return out


def compute_similarity(behaviour: torch.Tensor, datapoints: torch.Tensor) -> np.ndarray:
    """Cosine matrix ``[P, C]`` between behaviour vectors ``[P, d]`` and datapoint vectors ``[C, d]``."""
    b, _ = unit_rows(behaviour)
    x, _ = unit_rows(datapoints)
    return (torch.nan_to_num(b, nan=0.0) @ torch.nan_to_num(x, nan=0.0).T).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------- column selection


def select_columns(store, behaviour: torch.Tensor, layer: int, top_k: int | None, max_columns: int,
                   chunk_rows: int = 65536) -> tuple[np.ndarray, torch.Tensor, dict[str, Any], np.ndarray]:
    """Choose the datapoints that become columns, and read their vectors.

    Pairs with a zero or non-finite vector have no direction and are never columns. With ``top_k`` the columns
    are the union of each prompt's ``top_k`` most similar pairs; without it, every pair, unless the store holds
    more than ``max_columns`` pairs, in which case ``top_k = max_columns // P`` is used. The store is read twice
    (scores, then the selected rows), chunk by chunk, so memory stays flat in its size.

    Args:
        store: An open ``VectorStore``.
        behaviour: ``[P, d]`` behaviour vectors.
        layer: Stored layer to read.
        top_k: Pairs kept per prompt (``None``: see above).
        max_columns: Largest number of columns without an explicit ``top_k``.
        chunk_rows: Rows read at a time.

    Returns:
        ``(store rows [C] sorted, vectors [C, d], info, no-direction rows [Z] sorted)`` with info
        ``top_k_per_prompt``, ``n_no_direction``; the no-direction rows are the pairs whose vector is zero or
        non-finite in this store (a view pooled otherwise may give them one).
    """
    units, _ = unit_rows(behaviour)
    units = torch.nan_to_num(units, nan=0.0)  # [P, d]
    n_prompts = units.shape[0]
    info: dict[str, Any] = {"top_k_per_prompt": top_k}
    if top_k is None and store.n > max_columns:
        top_k = max(1, max_columns // max(n_prompts, 1))
        info["top_k_per_prompt"] = top_k
        logger.warning("%d pairs exceed max_columns=%d: keeping the union of each prompt's top-%d pairs",
                       store.n, max_columns, top_k)
    # running top-k per prompt: best_vals / best_rows [k, P]
    best_vals = torch.empty(0, n_prompts)
    best_rows = torch.empty(0, n_prompts, dtype=torch.long)
    valid_rows = []
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        x, ok = unit_rows(chunk)
        index = torch.arange(start, start + len(chunk))
        valid_rows.append(index[ok])
        if top_k is None:
            continue
        sims = torch.nan_to_num(x, nan=0.0) @ units.T  # [rows, P]
        sims[~ok] = -torch.inf
        vals = torch.cat([best_vals, sims])
        rows_all = torch.cat([best_rows, index[:, None].expand(-1, n_prompts)])
        k = min(top_k, len(vals))
        best_vals, pick = torch.topk(vals, k, dim=0)
        best_rows = torch.gather(rows_all, 0, pick)
    valid = torch.cat(valid_rows).numpy() if valid_rows else np.empty(0, dtype=np.int64)
    info["n_no_direction"] = store.n - len(valid)
    no_direction = np.setdiff1d(np.arange(store.n, dtype=np.int64), valid)
    rows = valid if top_k is None else np.unique(best_rows[torch.isfinite(best_vals)].numpy())
    parts = []
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        local = rows[(rows >= start) & (rows < start + len(chunk))] - start
        if len(local):
            parts.append(chunk[torch.as_tensor(local)])
    width = store.hidden_size or behaviour.shape[1]
    vectors = torch.cat(parts) if parts else torch.empty(0, width)
    return rows.astype(np.int64), vectors.float(), info, no_direction
