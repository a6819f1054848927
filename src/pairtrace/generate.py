"""Batched sampling from a loaded model on prompt records, written as generation records (JSONL, resumable).

A generation record is the prompt record plus::

    {"model": str, "sample": int, "response": str, "seed": int, "temperature": float, "top_p": float,
     "max_new_tokens": int, "finish_reason": "eos" | "length"}

Prompts are formatted with the model's chat template (:func:`pairtrace.models.format_prompt`), left-padded
into batches of similar length, and each response is read from the positions *after the full padded input*,
so padding can never shift prompt tokens into the recorded response. Generation stops at EOS or an
end-of-turn token. Batches are formed over all prompts and samples and each is seeded from the run seed and
its first item, so a run is deterministic and a resumed run (even after a batch was only partly written)
produces the same records as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.options import OptionError
from pairtrace.records import append_jsonl, iter_jsonl, write_jsonl_atomic

logger = logging.getLogger(__name__)

END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "</s>")
"""Tokens that also end a response when the vocabulary has them."""

GENERATION_FIELDS = ("model", "sample", "response", "seed", "temperature", "top_p", "max_new_tokens",
                     "finish_reason")


@dataclass
class GenerationConfig:
    """How to sample responses."""

    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold in (0, 1]."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest response, in tokens."})
    n_samples: int = field(default=1, metadata={"help": "Responses per prompt."})
    batch_size: int = field(default=32, metadata={"help": "Sequences generated together."})
    seed: int = field(default=0, metadata={"help": "Run seed (each batch is seeded from it and its first item)."})
    backend: str = field(
        default="auto",
        metadata={"help": "Generation engine: auto (vLLM when it is installed and a CUDA GPU is present, else "
                  "Hugging Face), hf or vllm. Same prompts, sampling settings and seeds on both; vLLM's sampler "
                  "draws other (equally distributed) samples."},
    )

    def __post_init__(self) -> None:
        from pairtrace.generation_engines import BACKENDS

        if self.backend not in BACKENDS:
            raise OptionError(f"{{backend}} must be one of {list(BACKENDS)}, got {self.backend!r}", "backend")
        if self.temperature < 0:
            raise OptionError(f"{{temperature}} must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise OptionError(f"{{top_p}} must be in (0, 1], got {self.top_p}", "top_p")
        for name in ("max_new_tokens", "n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"{{{name}}} must be at least 1, got {getattr(self, name)}", name)


def generation_key(record: dict[str, Any]) -> tuple[str, str, int]:
    """The identity of a generation record: ``(id, model, sample)``."""
    return (str(record["id"]), str(record["model"]), int(record["sample"]))


def _stop_token_ids(loaded: Any) -> list[int]:
    tok = loaded.tokenizer
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos]))
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    if not ids:
        raise ConfigError("the tokenizer has no EOS or end-of-turn token: generation could not stop")
    return sorted(ids)


def _encode_prompts(loaded: Any, records: Sequence[dict[str, Any]]) -> list[list[int]]:
    from pairtrace.models import format_prompt

    tok = loaded.tokenizer
    texts = [format_prompt(loaded, r["prompt"]) for r in records]
    encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = tok.bos_token_id
    out = []
    for ids in encoded:
        ids = list(ids)
        if getattr(loaded, "prepend_bos", False) and ids[:1] != [bos]:
            ids = [bos, *ids]
        out.append(ids)
    return out


def _batch_seed(seed: int, first_key: tuple[str, int]) -> int:
    digest = hashlib.sha256(f"{seed}\0{first_key[0]}\0{first_key[1]}".encode()).hexdigest()
    return int(digest[:8], 16)


def generate_responses(
    loaded: Any,
    prompt_records: Sequence[dict[str, Any]],
    config: GenerationConfig,
    *,
    model_name: str,
    progress: bool = True,
    skip: Iterable[tuple[str, str, int]] = (),
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample ``config.n_samples`` responses per prompt record.

    Args:
        loaded: A :class:`pairtrace.models.LoadedModel` (or any object with ``model``, ``tokenizer`` and the
            fields :func:`pairtrace.models.format_prompt` reads).
        prompt_records: Prompt records (``id`` and ``prompt`` are required; every field is copied).
        config: Sampling settings.
        model_name: Value of the records' ``model`` field (``m0``, ``m1``, a path...).
        progress: Show a progress bar over batches.
        skip: Keys ``(id, model, sample)`` already generated; they are not returned again (a batch that holds
            some of them is regenerated whole, with its usual seed, so the missing records are the same as in
            an uninterrupted run).
        on_batch: Called with each finished batch's records (e.g. to append them to a file).

    Returns:
        The new generation records, in prompt order then sample order.

    Raises:
        DataError: A prompt record without ``id`` or ``prompt`` (records are numbered from 1).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig as HFGenerationConfig

    from pairtrace.models import pad_token_id

    for i, record in enumerate(prompt_records):
        for name in ("id", "prompt"):
            if name not in record:
                raise DataError(f"prompt record {i + 1}: field '{name}' is missing")
    done = set(skip)

    def is_done(item: tuple[int, int]) -> bool:
        return (str(prompt_records[item[0]]["id"]), model_name, item[1]) in done

    # Batches are formed over *every* (prompt, sample), whatever is already done, so that a resumed run
    # regenerates exactly the batches of an uninterrupted one (same members, same seed) and keeps the records
    # that are missing: a batch cut short by an interruption is simply generated again.
    items = [(i, s) for i in range(len(prompt_records)) for s in range(config.n_samples)]
    if all(is_done(item) for item in items):
        return []
    encoded = dict(enumerate(_encode_prompts(loaded, prompt_records)))
    items.sort(key=lambda item: (len(encoded[item[0]]), item[0], item[1]))  # similar lengths share a batch
    batches = [items[b : b + config.batch_size] for b in range(0, len(items), config.batch_size)]
    batches = [batch for batch in batches if not all(is_done(item) for item in batch)]

    tok, model = loaded.tokenizer, loaded.model
    stop_ids = _stop_token_ids(loaded)
    pad_id = pad_token_id(tok)
    greedy = config.temperature == 0
    hf_config = HFGenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else config.temperature,
        top_p=None if greedy else config.top_p,
        top_k=None,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    device = next(model.parameters()).device
    results: dict[tuple[int, int], dict[str, Any]] = {}
    for batch in tqdm(batches, desc=f"generate {model_name}", disable=not progress, unit="batch"):
        width = max(len(encoded[i]) for i, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T], left padded
        attention = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for row, (i, _) in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        first = batch[0]
        torch.manual_seed(_batch_seed(config.seed, (str(prompt_records[first[0]]["id"]), first[1])))
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=hf_config
            )  # [B, T + new]
        new_tokens = out[:, width:].tolist()  # everything after the full padded input
        finished: list[dict[str, Any]] = []
        for row, (i, s) in enumerate(batch):
            ids = new_tokens[row]
            stop_at = next((j for j, t in enumerate(ids) if t in stop_ids), None)
            response_ids = ids if stop_at is None else ids[:stop_at]
            record = {
                **prompt_records[i],
                "model": model_name,
                "sample": s,
                "response": tok.decode(response_ids, skip_special_tokens=True),
                "seed": config.seed,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens,
                "finish_reason": "length" if stop_at is None else "eos",
            }
            if not is_done((i, s)):
                results[(i, s)] = record
                finished.append(record)
        if on_batch is not None:
            on_batch(finished)
    return [results[key] for key in sorted(results)]


def _repair_tail(path: Path) -> None:
    """Cut a partly written last line (an interrupted append) so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    logger.warning("%s: dropping a partly written last line (%d bytes)", path, len(data) - cut)
    with path.open("r+b") as fh:
        fh.truncate(cut)


def append_generations(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Append generation records to a JSONL file in one write, flushed and synced to disk."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    append_jsonl(records, path)


def save_generations(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write generation records as JSONL, replacing the file atomically.

    Returns:
        The path written.
    """
    return write_jsonl_atomic(records, path)


def load_generations(path: str | Path) -> list[dict[str, Any]]:
    """Read generation records from JSONL (a partly written last line, from an interrupted run, is skipped).

    Raises:
        DataError: The file is missing, a complete line is not JSON, or a record lacks a field (the message
            names the line and the field).
    """
    return [record for _, record in load_numbered_generations(path)]


def load_numbered_generations(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """:func:`load_generations` with each record's line number in the file (from 1).

    Raises:
        DataError: As :func:`load_generations`.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    for line_no, record in iter_jsonl(path, allow_torn_tail=True):
        for name in ("id", *GENERATION_FIELDS):
            if name not in record:
                raise DataError(f"{Path(path).name} line {line_no}: field '{name}' is missing")
        out.append((line_no, record))
    return out


def check_resumable(existing: Sequence[dict[str, Any]], config: GenerationConfig, model_name: str,
                    out_path: Path, lines: Sequence[int] | None = None) -> None:
    """Refuse to extend a generation file written by another model or with other sampling settings.

    Args:
        existing: The records already in ``out_path``.
        config: This run's sampling settings.
        model_name: This run's ``model`` field; records of other models are not compared.
        out_path: The generation file, for messages.
        lines: Each record's line in the file (from 1; default: 1, 2, ... as if it had no blank line).

    Raises:
        ManifestMismatchError: Naming the line, the field and both values.
    """
    wanted = {"seed": config.seed, "temperature": config.temperature, "top_p": config.top_p,
              "max_new_tokens": config.max_new_tokens}
    for line, record in zip(lines or range(1, len(existing) + 1), existing, strict=True):
        if record.get("model") != model_name:
            continue  # records of other models may share a file; they are never regenerated here
        for key, value in wanted.items():
            if key in record and record[key] != value:
                raise ManifestMismatchError(
                    f"{out_path} line {line}: field '{key}' is {record[key]!r}, but this run uses {value!r}; "
                    "resuming would mix samples of two settings: write to another file or delete this one"
                )


def run_generate(
    model_path: str | Path | Any,
    prompts_path: str | Path,
    out_path: str | Path,
    config: GenerationConfig | None = None,
    *,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate responses for a prompt file into a JSONL file, resuming where an earlier run stopped.

    Records already in ``out_path`` (same id, model and sample) are kept and not generated again; new ones are
    appended batch by batch, so an interrupted run loses at most one batch. ``config.backend`` picks the engine
    (:func:`pairtrace.generation_engines.resolve_engine`); vLLM loads the weights itself (the Hugging Face model
    is then never loaded).

    Args:
        model_path: Model directory or hub id, or a :class:`pairtrace.models.ModelSpec` (its dtype, device,
            revision and chat template are used).
        prompts_path: Prompt records (JSONL).
        out_path: Generation records (JSONL), created or extended.
        config: Sampling settings (default :class:`GenerationConfig`).
        model_name: The records' ``model`` field (default: the model directory's name).
        progress: Show a progress bar.

    Returns:
        ``{"n_prompts", "n_existing", "n_new", "n_total", "seconds", "out", "config", "engine"}``.
    """
    from pairtrace.data.prompts import load_prompt_records
    from pairtrace.generation_engines import generate_with, resolve_engine
    from pairtrace.models import ModelSpec, load_model

    config = config or GenerationConfig()
    spec = model_path if isinstance(model_path, ModelSpec) else ModelSpec(name_or_path=str(model_path))
    engine = resolve_engine(config.backend, spec.device, key="backend (--backend)")
    start = time.perf_counter()
    records = load_prompt_records(prompts_path)
    out_path = Path(out_path)
    name = model_name or Path(spec.name_or_path.rstrip("/")).name
    numbered = load_numbered_generations(out_path) if out_path.is_file() else []
    existing = [record for _, record in numbered]
    check_resumable(existing, config, name, out_path, [line for line, _ in numbered])
    done = {generation_key(r) for r in existing}
    # Hugging Face: the loaded model (a bare path loads as before: load_model's defaults); vLLM: the spec
    model = load_model(spec if isinstance(model_path, ModelSpec) else model_path) if engine == "hf" else spec
    new = generate_with(
        model, records, config, model_name=name, engine=engine, progress=progress, skip=done,
        on_batch=lambda batch: append_generations(batch, out_path),
    )
    return {
        "n_prompts": len(records),
        "n_existing": len(existing),
        "n_new": len(new),
        "n_total": len(existing) + len(new),
        "seconds": round(time.perf_counter() - start, 2),
        "out": str(out_path),
        "config": asdict(config),
        "engine": engine,
    }
