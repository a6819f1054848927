"""Datapoint vectors (paper Def. 3.2) into a resumable store, and behaviour vectors, probe and bank (Def. 3.1).

- datapoint vector  v_d = ā(prompt, chosen; M0, k) − ā(prompt, rejected; M0, k)
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
from tqdm.auto import tqdm

from pairtrace import __version__
from pairtrace.activations import compute_means_from_teacher_forced, nonfinite_rows
from pairtrace.data.pairs import compute_fingerprint
from pairtrace.data.types import Message, PairSet
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.models import LoadedModel, build_teacher_forcing, resolve_layers
from pairtrace.store import (
    MANIFEST_NAME,
    STORE_DTYPES,
    Manifest,
    VectorStore,
    check_compatible,
    remove_temporary_files,
    shard_path,
    write_bytes_atomic,
    write_shard,
)

logger = logging.getLogger(__name__)

BEHAVIOUR_TENSORS = "behaviour.safetensors"
BEHAVIOUR_METADATA = "behaviour.json"
_RESUME_FIELDS = ("kind", "model", "layers", "template", "dataset", "ids", "shard_size", "dtype", "settings")


def build_expected(loaded: LoadedModel, layers: Sequence[int]) -> dict[str, Any]:
    """The ``model``/``layers``/``template`` values that :func:`pairtrace.store.check_compatible` compares."""
    return {
        "model": dict(loaded.identity),
        "layers": list(layers),
        "template": {"mode": loaded.template_mode, "hash": loaded.identity["template_hash"]},
    }


def _check_unique_ids(pairs: PairSet) -> None:
    seen: dict[str, int] = {}
    for p in pairs:
        if p.id in seen:
            raise DataError(f"pair at row {p.row} field 'id': id {p.id!r} repeats the pair at row {seen[p.id]}")
        seen[p.id] = p.row


def _reset_store(directory: Path) -> None:
    """Remove the manifest and shard files of a previous extraction in ``directory`` (nothing else)."""
    for path in directory.glob("shard-*.safetensors"):
        path.unlink()
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    remove_temporary_files(directory)


def compute_datapoint_vectors(
    loaded: LoadedModel,
    pairs: PairSet,
    out_dir: str | Path,
    *,
    layers: int | Sequence[int] | None = None,
    shard_size: int = 1024,
    batch_tokens: int = 16384,
    max_length: int = 2048,
    resume: bool = True,
    progress: bool = True,
    dtype: str = "float32",
) -> VectorStore:
    """Extract v_d = ā(prompt, chosen; M0, k) − ā(prompt, rejected; M0, k) for every pair into a vector store.

    Shard ``i`` holds pairs ``[i * shard_size, (i + 1) * shard_size)`` in input order. The manifest is written
    before any shard; each shard is written atomically, so an interrupted run resumes where it stopped and gives
    the same bytes as an uninterrupted one.

    Args:
        loaded: M0.
        pairs: The preference pairs.
        out_dir: Store directory (created if missing).
        layers: Layers to extract (``None`` = default layer); all come from one forward pass per batch.
        shard_size: Pairs per shard.
        batch_tokens: Token budget per forward pass.
        max_length: Maximum tokens per sequence (prompt cut from the left first).
        resume: Keep finished shards of a previous run with the same manifest; if false, start over (the
            previous manifest and shards in ``out_dir`` are deleted).
        progress: Show a progress bar over pairs.
        dtype: Storage dtype: float32, bfloat16 or float16 (computation is always float32).

    Returns:
        The complete store.

    Raises:
        ManifestMismatchError: ``out_dir`` holds a store made with another model, layer, template, dataset,
            shard size, dtype or ``max_length`` (with ``resume``).
        DataError: Duplicate pair ids, or shard files without a manifest in ``out_dir``.
        ConfigError: Bad layer, shard size or dtype.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(STORE_DTYPES)}")
    _check_unique_ids(pairs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(pairs)
    expected = build_expected(loaded, layers)
    manifest = Manifest(
        kind="datapoint",
        model=expected["model"],
        layers=layers,
        template=expected["template"],
        dataset={
            "origin": pairs.origin,
            "fingerprint": pairs.fingerprint or compute_fingerprint(pairs),
            "n_pairs": n,
        },
        ids=[p.id for p in pairs],
        shard_size=shard_size,
        dtype=dtype,
        n_shards=(n + shard_size - 1) // shard_size,
        hidden_size=loaded.hidden_size,
        settings={"max_length": max_length},
    )
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists() and resume:
        previous = Manifest.load(out_dir)
        try:
            check_compatible(manifest.to_dict(), previous, fields=_RESUME_FIELDS, where=str(out_dir))
        except ManifestMismatchError as exc:
            raise ManifestMismatchError(
                f"{exc} (extract into another directory, or pass resume=False to start over)"
            ) from None
        manifest = previous
    elif manifest_path.exists():
        _reset_store(out_dir)
    elif any(out_dir.glob("shard-*.safetensors")):
        raise DataError(f"{out_dir}: holds shard files but no {MANIFEST_NAME}; use an empty directory")
    manifest.save(out_dir)
    remove_temporary_files(out_dir)

    store_dtype = STORE_DTYPES[dtype]
    with tqdm(total=n, desc="datapoint vectors", disable=not progress, unit="pair") as bar:
        for index in range(manifest.n_shards):
            start, end = manifest.shard_range(index)
            if shard_path(out_dir, index).is_file():
                bar.update(end - start)
                continue
            chunk = pairs.pairs[start:end]
            m = len(chunk)
            items = build_teacher_forcing(
                loaded,
                [p.prompt for p in chunk] * 2,
                [p.chosen for p in chunk] + [p.rejected for p in chunk],
                max_length,
            )
            means = compute_means_from_teacher_forced(
                loaded, items, layers, batch_tokens=batch_tokens, progress=False
            )  # [2m, L, d]: chosen rows then rejected rows
            diff = means[:m] - means[m:]  # [m, L, d]
            counts = torch.tensor(
                [[items[i].n_response_tokens, items[m + i].n_response_tokens] for i in range(m)], dtype=torch.long
            )  # [m, 2]
            tensors = {f"layer_{k}": diff[:, j].to(store_dtype) for j, k in enumerate(layers)}
            tensors["n_response_tokens"] = counts
            write_shard(out_dir, index, tensors)
            bad = int(nonfinite_rows(diff).sum())
            if bad:
                logger.warning("%d pair(s) in shard %d have non-finite vectors (e.g. an empty response)", bad, index)
            bar.update(m)
    return VectorStore.open(out_dir)


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
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object")
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
    batch_tokens: int,
    max_length: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, list[int]]:
    items = build_teacher_forcing(loaded, prompts, responses, max_length)
    means = compute_means_from_teacher_forced(
        loaded, items, layers, batch_tokens=batch_tokens, progress=progress, desc=desc
    )
    return means, [it.n_response_tokens for it in items]


def compute_behaviour_vectors(
    loaded: LoadedModel,
    triples: Sequence[Triple],
    *,
    layers: int | Sequence[int] | None = None,
    r1_model: LoadedModel | None = None,
    batch_tokens: int = 16384,
    max_length: int = 2048,
    progress: bool = True,
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
        batch_tokens: Token budget per forward pass.
        max_length: Maximum tokens per sequence.
        progress: Show progress bars.

    Returns:
        The behaviour vectors.

    Raises:
        DataError: No triples, or none with finite activations.
        ConfigError: ``r1_model`` of another depth or width, or a bad layer.
    """
    layers = resolve_layers(layers, loaded.n_layers)
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
        both, counts = _response_means(
            loaded,
            prompts * 2,
            [x.r1 for x in triples] + [x.r0 for x in triples],
            layers,
            batch_tokens,
            max_length,
            progress,
            "behaviour vectors",
        )
        a1, a0 = both[:t], both[t:]  # [t, L, d] each
        n1, n0 = counts[:t], counts[t:]
    else:
        a1, n1 = _response_means(
            r1_model, prompts, [x.r1 for x in triples], layers, batch_tokens, max_length, progress, "r1 responses"
        )
        a0, n0 = _response_means(
            loaded, prompts, [x.r0 for x in triples], layers, batch_tokens, max_length, progress, "r0 responses"
        )
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
        "settings": {"max_length": max_length},
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
    tmp = directory / f".{BEHAVIOUR_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / BEHAVIOUR_TENSORS)
    meta = {**bv.metadata, "layers": list(bv.layers), "bank_prompt_ids": list(bv.bank_prompt_ids)}
    write_bytes_atomic(directory / BEHAVIOUR_METADATA, json.dumps(meta, indent=1, ensure_ascii=False).encode())
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


__all__ = [
    "BehaviourVectors",
    "Triple",
    "build_expected",
    "compute_behaviour_vectors",
    "compute_datapoint_vectors",
    "load_behaviour_vectors",
    "load_triples",
    "save_behaviour_vectors",
]
