"""Behaviour vectors (paper Def. 3.1), probe and bank from (prompt, r1, r0) triples, and their files.

- behaviour vector  v_b = ā(p, r1; M0, k) − ā(p, r0; M0, k)  for a triple (p, r1, r0)
- probe             mean of all r1 activations − mean of all r0 activations (over all triples)
- bank              one behaviour vector per test prompt: that prompt's r1 mean − r0 mean
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pairtrace import __version__
from pairtrace.activations import (
    compute_means_from_teacher_forced,
    nonfinite_rows,
)
from pairtrace.data.types import Message
from pairtrace.errors import ConfigError, DataError
from pairtrace.models import LoadedModel, build_teacher_forcing, effective_max_length, resolve_layers
from pairtrace.pooling import ResponsePooling
from pairtrace.records import atomic_path, iter_jsonl, write_bytes_atomic
from pairtrace.store import (
    build_expected,
    pooling_settings,
)

logger = logging.getLogger(__name__)

BEHAVIOUR_TENSORS = "behaviour.safetensors"
BEHAVIOUR_METADATA = "behaviour.json"


@dataclass(frozen=True)
class Triple:
    """A test prompt with a response that shows the behaviour (r1) and one that does not (r0).

    Attributes:
        prompt: The prompt turns.
        r1: Response showing the behaviour (usually sampled from M1).
        r0: Response without it (usually sampled from M0).
        prompt_id: Groups triples of the same prompt (one bank vector per prompt id).
    """

    prompt: tuple[Message, ...]
    r1: str
    r0: str
    prompt_id: str


def _prompt_id_of(prompt: tuple[Message, ...]) -> str:
    text = json.dumps(list(prompt), sort_keys=True, ensure_ascii=False)
    return "prompt-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _parse_prompt(value: Any, where: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} field 'prompt': expected a string or a non-empty list of messages")
    turns = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where} field 'prompt[{j}]': expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where} field 'prompt[{j}].{key}': expected a string")
        turns.append({"role": message["role"], "content": message["content"]})
    return tuple(turns)


def load_triples(path: str | Path) -> list[Triple]:
    """Read behaviour triples from JSONL.

    Each line is an object with ``prompt`` (a string = one user turn, or a list of ``{role, content}``
    messages), ``r1`` and ``r0`` (non-empty strings) and optionally ``prompt_id`` (default: a hash of the
    prompt, so triples of the same prompt share it). Blank lines are skipped.

    Args:
        path: The JSONL file.

    Returns:
        The triples, in file order.

    Raises:
        DataError: Naming the file, the line and the field of the first bad record.
    """
    path = Path(path)
    triples = []
    for line_no, record in iter_jsonl(path):
        where = f"{path} line {line_no}"
        if "prompt" not in record:
            raise DataError(f"{where} field 'prompt': missing")
        prompt = _parse_prompt(record["prompt"], where)
        for key in ("r1", "r0"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise DataError(f"{where} field '{key}': expected a non-empty string")
        prompt_id = record.get("prompt_id")
        if prompt_id is None:
            prompt_id = _prompt_id_of(prompt)
        elif not isinstance(prompt_id, str | int):
            raise DataError(f"{where} field 'prompt_id': expected a string")
        triples.append(Triple(prompt, record["r1"], record["r0"], str(prompt_id)))
    return triples


@dataclass
class BehaviourVectors:
    """Behaviour vectors of a set of triples, pooled into a probe and a per-prompt bank.

    ``metadata`` has the manifest's shape for ``model``/``layers``/``template`` so that
    ``check_compatible(bv.metadata, store.manifest, fields=("model", "layers", "template"))`` works.
    """

    layers: list[int] = field(metadata={"help": "Layers (hidden_states indices), in the order of dim 1 below."})
    per_triple: torch.Tensor = field(metadata={"help": "[t, L, d] float32: r1 mean − r0 mean per triple."})
    probe: torch.Tensor = field(metadata={"help": "[L, d]: mean of all r1 activations − mean of all r0 ones."})
    bank: torch.Tensor = field(metadata={"help": "[b, L, d]: one behaviour vector per prompt id."})
    bank_prompt_ids: list[str] = field(metadata={"help": "Prompt id of each bank row."})
    metadata: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "n_triples, n_prompts, model, r1_model, layers, template, counts of skipped triples."},
    )

    @property
    def pooling(self) -> ResponsePooling:
        """How the response means were pooled (recorded in the metadata's ``settings``)."""
        return ResponsePooling.from_settings(self.metadata.get("settings"))

    def layer_index(self, layer: int) -> int:
        """Position of ``layer`` in :attr:`layers`."""
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} is not in these behaviour vectors (layers: {self.layers})")
        return self.layers.index(layer)

    def probe_at(self, layer: int) -> torch.Tensor:
        """Probe vector ``[d]`` at one layer."""
        return self.probe[self.layer_index(layer)]

    def bank_at(self, layer: int) -> torch.Tensor:
        """Bank ``[b, d]`` at one layer."""
        return self.bank[:, self.layer_index(layer)]


def _response_means(
    loaded: LoadedModel,
    prompts: list[tuple[Message, ...]],
    responses: list[str],
    layers: list[int],
    batch_tokens: int | None,
    max_length: int,
    progress: bool,
    desc: str,
    pooling: ResponsePooling,
) -> tuple[torch.Tensor, list[int], list[bool]]:
    items = build_teacher_forcing(loaded, prompts, responses, max_length, pooling=pooling)
    means = compute_means_from_teacher_forced(
        loaded, items, layers, batch_tokens=batch_tokens, progress=progress, desc=desc, pooling=pooling
    )
    return means, [it.n_response_tokens for it in items], [it.truncated for it in items]


def compute_behaviour_vectors(
    loaded: LoadedModel,
    triples: Sequence[Triple],
    *,
    layers: int | Sequence[int] | None = None,
    r1_model: LoadedModel | None = None,
    batch_tokens: int | None = None,
    max_length: int = 2048,
    progress: bool = True,
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
) -> BehaviourVectors:
    """Behaviour vectors (paper Def. 3.1), probe and bank from (prompt, r1, r0) triples.

    Both responses are teacher-forced through ``loaded`` (M0) by default; ``r1_model`` (e.g. M1) runs the r1
    side instead when given. Triples whose r1 or r0 activations are not finite are left out of the probe and the
    bank (counted in ``metadata["n_nonfinite"]``); a prompt id left without any triple gets no bank row.

    Args:
        loaded: M0.
        triples: The triples.
        layers: Layers (``None`` = default layer).
        r1_model: Optional model for the r1 side (same depth and width as ``loaded``).
        batch_tokens: Token budget per forward pass (``None``: the device's default).
        max_length: Maximum tokens per sequence.
        progress: Show progress bars.
        response_tokens: Average each response's first this many tokens only (``None``: all); must match the
            datapoint store's (checked when scoring).
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        The behaviour vectors.

    Raises:
        DataError: No triples, or none with finite activations.
        ConfigError: ``r1_model`` of another depth or width, or a bad layer.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    if not triples:
        raise DataError("no behaviour triples were given")
    if r1_model is not None and (r1_model.n_layers, r1_model.hidden_size) != (loaded.n_layers, loaded.hidden_size):
        raise ConfigError(
            f"r1_model has {r1_model.n_layers} layers of width {r1_model.hidden_size}, but the model has "
            f"{loaded.n_layers} layers of width {loaded.hidden_size}"
        )
    prompts = [t.prompt for t in triples]
    t = len(triples)
    if r1_model is None:
        both, counts, cut = _response_means(
            loaded,
            prompts * 2,
            [x.r1 for x in triples] + [x.r0 for x in triples],
            layers,
            batch_tokens,
            max_length,
            progress,
            "behaviour vectors",
            pooling,
        )
        a1, a0 = both[:t], both[t:]  # [t, L, d] each
        n1, n0 = counts[:t], counts[t:]
        cut1, cut0 = cut[:t], cut[t:]
    else:
        a1, n1, cut1 = _response_means(
            r1_model, prompts, [x.r1 for x in triples], layers, batch_tokens, max_length, progress, "r1 responses",
            pooling,
        )
        a0, n0, cut0 = _response_means(
            loaded, prompts, [x.r0 for x in triples], layers, batch_tokens, max_length, progress, "r0 responses",
            pooling,
        )
    n_cut = sum(a or b for a, b in zip(cut1, cut0, strict=True))
    if n_cut:
        logger.warning("%d of %d triple(s) had their prompt or a response cut to fit %d tokens (prompts from the "
                       "left, responses from the right)", n_cut, t, effective_max_length(loaded, max_length))
    per_triple = a1 - a0  # [t, L, d]
    valid = ~(nonfinite_rows(a1) | nonfinite_rows(a0))  # [t]
    if not bool(valid.any()):
        raise DataError("no behaviour triple has finite activations (are all responses empty?)")
    probe = a1[valid].mean(0) - a0[valid].mean(0)  # [L, d]

    order: dict[str, list[int]] = {}
    for i, x in enumerate(triples):
        order.setdefault(x.prompt_id, [])
        if bool(valid[i]):
            order[x.prompt_id].append(i)
    bank_ids = [pid for pid, rows in order.items() if rows]
    dropped = [pid for pid, rows in order.items() if not rows]
    if bank_ids:
        bank = torch.stack([a1[order[pid]].mean(0) - a0[order[pid]].mean(0) for pid in bank_ids])  # [b, L, d]
    else:
        bank = torch.empty(0, len(layers), loaded.hidden_size)
    expected = build_expected(loaded, layers)
    metadata = {
        "kind": "behaviour",
        **expected,
        "r1_model": dict(r1_model.identity) if r1_model is not None else None,
        "n_triples": t,
        "n_prompts": len(order),
        "n_nonfinite": int((~valid).sum()),
        "nonfinite_triples": [i for i in range(t) if not bool(valid[i])],
        "bank_dropped_prompt_ids": dropped,
        "triple_prompt_ids": [x.prompt_id for x in triples],
        "n_response_tokens": [[a, b] for a, b in zip(n1, n0, strict=True)],
        "settings": pooling_settings(max_length, pooling),
        "truncation": {
            "max_length": max_length,
            "effective_max_length": effective_max_length(loaded, max_length),
            "max_positions": loaded.max_positions,
            "n_truncated_triples": n_cut,
        },
        "pairtrace_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return BehaviourVectors(
        layers=layers, per_triple=per_triple, probe=probe, bank=bank, bank_prompt_ids=bank_ids, metadata=metadata
    )


def save_behaviour_vectors(bv: BehaviourVectors, directory: str | Path) -> Path:
    """Save behaviour vectors: ``behaviour.safetensors`` (per_triple, probe, bank) and ``behaviour.json``.

    Args:
        bv: The behaviour vectors.
        directory: Target directory (created if missing).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "per_triple": bv.per_triple.float().contiguous(),
        "probe": bv.probe.float().contiguous(),
        "bank": bv.bank.float().contiguous(),
    }
    with atomic_path(directory / BEHAVIOUR_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    meta = {**bv.metadata, "layers": list(bv.layers), "bank_prompt_ids": list(bv.bank_prompt_ids)}
    write_bytes_atomic(json.dumps(meta, indent=1, ensure_ascii=False).encode(), directory / BEHAVIOUR_METADATA)
    return directory


def load_behaviour_vectors(directory: str | Path) -> BehaviourVectors:
    """Load behaviour vectors saved by :func:`save_behaviour_vectors`.

    Raises:
        DataError: Missing files, or tensors whose shapes disagree with the metadata.
    """
    directory = Path(directory)
    meta_path, tensor_path = directory / BEHAVIOUR_METADATA, directory / BEHAVIOUR_TENSORS
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise DataError(f"{directory}: missing {path.name} (not a behaviour-vector directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: not valid JSON ({exc})") from exc
    tensors = load_file(str(tensor_path))
    for key in ("layers", "bank_prompt_ids"):
        if key not in meta:
            raise DataError(f"{meta_path} field '{key}': missing")
    layers, bank_ids = list(meta["layers"]), list(meta["bank_prompt_ids"])
    probe, bank, per_triple = tensors["probe"], tensors["bank"], tensors["per_triple"]
    if probe.shape[0] != len(layers) or bank.shape[0] != len(bank_ids) or per_triple.shape[1] != len(layers):
        raise DataError(
            f"{tensor_path}: tensor shapes probe {tuple(probe.shape)}, bank {tuple(bank.shape)}, per_triple "
            f"{tuple(per_triple.shape)} disagree with {len(layers)} layers and {len(bank_ids)} bank prompts"
        )
    return BehaviourVectors(
        layers=layers, per_triple=per_triple, probe=probe, bank=bank, bank_prompt_ids=bank_ids, metadata=meta
    )
