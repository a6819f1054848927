"""Load a causal LM and its tokenizer, format prompts, choose layers, and build teacher-forced inputs.

Layer convention (one everywhere): layer ``k`` is the residual stream after ``k`` decoder blocks, i.e. Hugging
Face ``hidden_states[k]``; ``0`` is the embedding output and ``n_layers`` is the output of the final norm.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairtrace.data.types import Message
from pairtrace.errors import ConfigError
from pairtrace.model_spec import DTYPE_NAMES, ModelSpec
from pairtrace.pooling import ResponsePooling

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

PLAIN_FORMAT = (
    "plain-v1: single user turn = its content; otherwise 'Role: content' turns joined by a blank line, "
    "then 'Assistant:'"
)
"""Description of the plain formatting; its hash identifies plain-mode artifacts."""

_SAMPLE_BYTES = 1 << 16  # bytes read per sampled range when fingerprinting weight files
_SAMPLE_POINTS = (0.0, 1 / 3, 2 / 3, 1.0)  # relative positions of the sampled ranges in a file's data section


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and everything needed to identify it in manifests.

    Attributes:
        model: The causal LM.
        tokenizer: Its tokenizer.
        spec: The spec it was loaded from.
        n_layers: Number of decoder blocks (valid layers are ``0..n_layers``).
        hidden_size: Width of the residual stream.
        device: Device of the weights.
        dtype: Dtype of the weights.
        template_mode: ``"chat"`` (the tokenizer's chat template) or ``"plain"`` (see :func:`format_prompt`).
        identity: ``name``, ``revision``, ``weights_hash``, ``template_mode``, ``template_hash``.
        prepend_bos: Whether the tokenizer adds a BOS by default (teacher forcing then ensures exactly one).
        max_positions: The model's maximum positions (``max_position_embeddings`` of its text config; ``None``
            when it has none): no sequence is ever longer.
    """

    model: Any
    tokenizer: Any
    spec: ModelSpec
    n_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    template_mode: str
    identity: dict[str, Any]
    prepend_bos: bool = False
    max_positions: int | None = None


@dataclass(frozen=True)
class TeacherForced:
    """Token ids of one prompt + response, and where the response is.

    Attributes:
        input_ids: Prompt tokens followed by response tokens.
        response_start: Index of the first response token.
        response_end: One past the last response token (``len(input_ids)``).
        truncated: Whether the prompt or the response was cut to fit ``max_length``.
    """

    input_ids: list[int]
    response_start: int
    response_end: int
    truncated: bool

    @property
    def n_response_tokens(self) -> int:
        """Number of response tokens kept."""
        return self.response_end - self.response_start


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device, checking that CUDA is there when asked for."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available on this machine")
    return torch.device(device)


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Linux ``/proc/cpuinfo`` flag ``amx_bf16``), where bfloat16
    matrix products run several times faster than float32 ones; False wherever the flags cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn a dtype name into a torch dtype; ``auto`` picks bfloat16 where it is fast, float32 elsewhere.

    Args:
        name: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        device: The device the model will run on.

    Returns:
        The dtype. ``auto``: bfloat16 on a CUDA device that supports it and on a CPU with AMX
        (:func:`cpu_has_amx_bf16`), float32 otherwise.
    """
    if name != "auto":
        return DTYPES[name]
    on_gpu = device.type == "cuda"
    fast = torch.cuda.is_bf16_supported() if on_gpu else device.type == "cpu" and cpu_has_amx_bf16()
    dtype = torch.bfloat16 if fast else torch.float32
    logger.info("dtype auto on %s: %s", device, str(dtype).removeprefix("torch."))
    return dtype


def compute_weights_fingerprint(model_dir: str | Path) -> str | None:
    """Cheap, content-sensitive fingerprint of the weight files in a directory.

    For each weight file (``*.safetensors``, else ``*.bin``/``*.pt``/``*.pth``), in name order, hash its name,
    its size, its safetensors header (tensor names, dtypes, shapes, offsets) and four 64 KiB ranges of its data
    (start, one third, two thirds, end). Reads well under a megabyte per file, so it is instant even for 7B models,
    while any retraining (which changes every weight) changes it.

    Args:
        model_dir: Directory holding the weight files.

    Returns:
        ``"sha256:<hex>"``, or ``None`` if the directory holds no weight files.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in model_dir.glob(ext))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            data_start = 0
            if path.suffix == ".safetensors" and size >= 8:
                header_len = int.from_bytes(fh.read(8), "little")
                data_start = min(size, 8 + header_len)
                digest.update(fh.read(header_len))
            span = max(0, size - data_start)
            for point in _SAMPLE_POINTS:
                offset = data_start + int(max(0, span - _SAMPLE_BYTES) * point)
                fh.seek(offset)
                digest.update(fh.read(_SAMPLE_BYTES))
    return f"sha256:{digest.hexdigest()}"


def _find_hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The local snapshot directory of a hub model already in the cache, if it can be found offline."""
    try:
        from transformers.utils import cached_file

        config_path = cached_file(name, "config.json", revision=revision, local_files_only=True)
    except Exception:  # any failure just means "not in the local cache"; the caller falls back
        return None
    return Path(config_path).parent if config_path else None


def compute_template_hash(template_mode: str, chat_template: Any) -> str:
    """SHA-256 of the chat template text (chat mode) or of :data:`PLAIN_FORMAT` (plain mode)."""
    if template_mode == "plain":
        text = PLAIN_FORMAT
    else:
        text = chat_template if isinstance(chat_template, str) else json.dumps(chat_template, sort_keys=True)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _resolve_template_mode(requested: str, tokenizer: Any, name: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise ConfigError(f"chat_template='chat' was requested but the tokenizer of {name!r} has no chat template")
    mode = requested if requested != "auto" else ("chat" if has_template else "plain")
    if mode == "chat":
        logger.info("Formatting prompts with the chat template of %s", name)
    else:
        logger.info(
            "Formatting prompts as plain text for %s (%s)",
            name,
            "as requested" if requested == "plain" else "its tokenizer has no chat template",
        )
    return mode


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials[:1] == [bos] and without[:1] != [bos]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def check_model_folder(folder: Path, name: str) -> None:
    """Check that a local model folder has a readable ``config.json``, weight files and tokenizer files.

    Raises:
        ConfigError: Naming the folder as given and what is missing or broken.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model folder {name!r} has no config.json (is it a model saved with save_pretrained?)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{config_path}{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ConfigError(f"model folder {name!r} has no weight files (model.safetensors or pytorch_model.bin)")
    if not any((folder / file).is_file() for file in _TOKENIZER_FILES):
        raise ConfigError(f"model folder {name!r} has no tokenizer files (tokenizer.json or tokenizer_config.json)")


def check_hub_id(name: str, local: Path) -> None:
    """Refuse a model name that is neither an existing folder nor shaped like a hub id (``owner/name``).

    Raises:
        ConfigError: Naming the path as given (and the folder it was looked for in, when relative).
    """
    if local.exists():
        raise ConfigError(f"model path {name!r} is not a folder")
    parts = name.split("/")
    looks_like_path = name.startswith((".", "/", "~")) or len(parts) > 2 or any(not p for p in parts) or "\\" in name
    if looks_like_path:
        where = "" if local.is_absolute() else f" (looked in {Path.cwd()})"
        raise ConfigError(f"model folder {name!r} does not exist{where}")


@contextlib.contextmanager
def _load_errors(name: str, what: str) -> Iterator[None]:
    """Turn a loader's error about ``name`` into a :class:`ConfigError` that names the model as given."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model {name!r}: could not load its {what}: {first} (no such local folder or hub model, no network, "
            "or the files are incomplete)"
        ) from None


def load_model(spec_or_path: ModelSpec | str | os.PathLike, **overrides: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id (+ revision), in eval mode.

    Args:
        spec_or_path: A :class:`ModelSpec`, or a directory / hub id.
        **overrides: Fields of :class:`ModelSpec` to override (e.g. ``device="cpu"``, ``dtype="bfloat16"``).

    Returns:
        The loaded model with its identity (name, revision, weights hash, template mode and hash).

    Raises:
        ConfigError: Unknown override, missing local directory, bad dtype/device/template mode, or
            ``chat_template="chat"`` for a tokenizer without a template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec_or_path if isinstance(spec_or_path, ModelSpec) else ModelSpec(name_or_path=str(spec_or_path))
    if overrides:
        unknown = sorted(set(overrides) - set(ModelSpec.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"load_model: unknown ModelSpec field(s) {unknown}")
        spec = replace(spec, **overrides)
    name = spec.name_or_path
    local = Path(name).expanduser()
    is_local = local.is_dir()
    if is_local:
        check_model_folder(local, name)
    else:
        check_hub_id(name, local)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source = str(local.resolve()) if is_local else name
    with _load_errors(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    with _load_errors(name, "weights"):
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
    model.to(device)
    model.eval()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = len(get_decoder_layers(model))
    hidden_size = int(text_config.hidden_size)
    template_mode = _resolve_template_mode(spec.chat_template, tokenizer, name)
    commit = getattr(config, "_commit_hash", None)
    weights_dir = local if is_local else _find_hub_snapshot(name, spec.revision)
    weights_hash = compute_weights_fingerprint(weights_dir) if weights_dir is not None else None
    if weights_hash is None:
        weights_hash = f"commit:{commit}" if commit else None
        logger.warning("Could not fingerprint the weight files of %s; using %s", name, weights_hash)
    identity = {
        "name": source,
        "revision": spec.revision or (None if is_local else commit),
        "weights_hash": weights_hash,
        "template_mode": template_mode,
        "template_hash": compute_template_hash(template_mode, getattr(tokenizer, "chat_template", None)),
    }
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        n_layers=n_layers,
        hidden_size=hidden_size,
        device=device,
        dtype=dtype,
        template_mode=template_mode,
        identity=identity,
        prepend_bos=_tokenizer_prepends_bos(tokenizer),
        max_positions=_max_positions(text_config),
    )


def _max_positions(text_config: Any) -> int | None:
    """``max_position_embeddings`` of a text config, when it is a positive integer."""
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


_CLAMP_WARNED: set[tuple[str, int, int]] = set()


def effective_max_length(loaded: LoadedModel, max_length: int) -> int:
    """``max_length`` clamped to the model's maximum positions, with one warning (per model and value) naming
    both numbers when it is cut.

    Args:
        loaded: The model.
        max_length: The requested maximum tokens per sequence.

    Returns:
        ``min(max_length, loaded.max_positions)`` (``max_length`` when the model states no maximum).
    """
    limit = getattr(loaded, "max_positions", None)
    if limit is None or max_length <= limit:
        return max_length
    key = (str(loaded.identity.get("name")) if isinstance(getattr(loaded, "identity", None), dict) else "", max_length,
           limit)
    if key not in _CLAMP_WARNED:
        _CLAMP_WARNED.add(key)
        logger.warning(
            "max_length %d is larger than the model's maximum positions (%d, max_position_embeddings); sequences "
            "are cut at %d tokens", max_length, limit, limit,
        )
    return limit


def as_loaded_model(model: LoadedModel | ModelSpec, caller: str) -> LoadedModel:
    """A loaded model as it is, or a spec loaded with :func:`load_model` (the one loader).

    Args:
        model: A loaded model, or the spec to load.
        caller: Name of the calling function, for the error message.

    Raises:
        ConfigError: Anything else: a bare path would load with default options (float32 for a bfloat16 run).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, ModelSpec):
        return load_model(model)
    raise ConfigError(f"{caller}: the model must be a LoadedModel or a ModelSpec, got {type(model).__name__} "
                      "(wrap a path in pairtrace.models.ModelSpec to choose its dtype and device)")


def _as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def format_prompt(loaded: LoadedModel, messages: str | Sequence[Message]) -> str:
    """Turn a prompt (the turns before the response) into the exact text the response follows.

    Chat mode applies the tokenizer's chat template with ``add_generation_prompt=True``. Plain mode, for models
    without a template: a single user turn is its content verbatim; anything else (several turns, a system
    turn) becomes ``"Role: content"`` turns joined by a blank line, followed by ``"\\n\\nAssistant:"``.

    Args:
        loaded: The model whose formatting to use.
        messages: The prompt turns; a string is one user turn.

    Returns:
        The formatted prompt text.
    """
    turns = _as_messages(messages)
    if loaded.template_mode == "chat":
        return loaded.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if len(turns) == 1 and turns[0].get("role") == "user":
        return turns[0]["content"]
    labelled = [f"{m['role'].capitalize()}: {m['content']}" for m in turns]
    return "\n\n".join([*labelled, "Assistant:"])


def default_layer(n_layers: int) -> int:
    """The paper's relative depth: ``round(0.625 * n_layers)``, rounding halves up, at least 1 (20 of 32)."""
    return max(1, min(n_layers, math.floor(0.625 * n_layers + 0.5)))


def resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Validate requested layers against the model's depth.

    Args:
        layers: One layer, several, or ``None`` for :func:`default_layer`.
        n_layers: The model's number of decoder blocks.

    Returns:
        Sorted unique layers.

    Raises:
        ConfigError: A layer outside ``0..n_layers`` (the message states the model's depth) or an empty list.
    """
    if layers is None:
        return [default_layer(n_layers)]
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ConfigError("no layers were requested")
    bad = [k for k in requested if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_layers]
    if bad:
        raise ConfigError(
            f"layer(s) {bad} out of range: this model has {n_layers} decoder layers, so valid layers are "
            f"0..{n_layers} (layer k = hidden_states[k], 0 = embeddings, {n_layers} = after the final norm)"
        )
    return sorted(set(requested))


_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
)
_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "transformer.norm_f",
)


def _get_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM.

    Supports Llama/OLMo 2/Mistral/Qwen-style ``model.layers``, GPT-2/Falcon ``transformer.h``, GPT-NeoX
    ``gpt_neox.layers``, OPT ``model.decoder.layers``, MPT ``transformer.blocks``.

    Raises:
        ConfigError: The layout is not one of these.
    """
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}: looked for {', '.join(_LAYER_PATHS)}")


def get_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (whose output is ``hidden_states[n_layers]``), if any."""
    for path in _NORM_PATHS:
        norm = _get_path(model, path)
        if isinstance(norm, nn.Module):
            return norm
    return None


def check_response_tokens(response_tokens: int | None) -> None:
    """Refuse a response head that is not a positive number of tokens (see
    :class:`pairtrace.pooling.ResponsePooling`)."""
    ResponsePooling(response_tokens)


def describe_response_pooling(response_tokens: int | None) -> str:
    """What a response mean covers, in words: ``every token`` or ``the first N tokens``
    (:meth:`pairtrace.pooling.ResponsePooling.describe`)."""
    return ResponsePooling(response_tokens).describe()


def pad_token_id(tokenizer: Any) -> int:
    """The token id that pads a batch: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are masked out of attention and never pooled, so the id only has to be a valid token.
    """
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def build_teacher_forcing(
    loaded: LoadedModel,
    prompts: Sequence[str | Sequence[Message]],
    responses: Sequence[str],
    max_length: int,
    response_tokens: int | None = None,
    *,
    pooling: ResponsePooling | None = None,
) -> list[TeacherForced]:
    """Tokenise prompt + response pairs for teacher forcing.

    The prompt is formatted with :func:`format_prompt` and tokenised without special tokens, then one BOS is put
    in front only if the tokenizer normally adds one and the text does not already start with it (a chat
    template that writes its own BOS is respected, never doubled). The response is tokenised separately without
    special tokens, so no EOS is added that the text did not contain. When the total exceeds ``max_length``,
    the prompt is cut from the left first (keeping its leading BOS), but it always keeps its last
    ``(max_length - 1) // 2`` tokens (all of them when it is shorter); a response too long for the rest is cut
    from the right. So a very long response never pushes its prompt out. ``max_length`` is clamped to the
    model's maximum positions (:func:`effective_max_length`).

    Args:
        loaded: The model (tokenizer, template mode).
        prompts: Prompts (turns before the response; a string is one user turn).
        responses: One response text per prompt.
        max_length: Maximum number of tokens per sequence (at least 2; at most the model's positions).
        response_tokens: Keep only the first this many response tokens (``None``: all). In a causal model those
            positions never see the later tokens, so a response mean over the cut sequence is the mean over the
            response's head.
        pooling: The response pooling (instead of ``response_tokens``); only the tokens it pools are kept
            (:meth:`pairtrace.pooling.ResponsePooling.keep`).

    Returns:
        One :class:`TeacherForced` per input, in order.

    Raises:
        ConfigError: ``max_length`` below 2, prompts/responses of different lengths, or a bad pooling.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    max_length = effective_max_length(loaded, max_length)
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    if len(prompts) != len(responses):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    tok = loaded.tokenizer
    bos = tok.bos_token_id
    texts = [format_prompt(loaded, p) for p in prompts]
    prompt_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    response_ids = tok(list(responses), add_special_tokens=False)["input_ids"] if texts else []
    out: list[TeacherForced] = []
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        p_ids, r_ids = list(p_ids), pooling.keep(r_ids)
        if loaded.prepend_bos and p_ids[:1] != [bos]:
            p_ids = [bos, *p_ids]
        truncated = len(p_ids) + len(r_ids) > max_length
        if truncated:
            head = p_ids[:1] if bos is not None and p_ids[:1] == [bos] else []
            body = p_ids[len(head) :]
            budget = max_length - len(head)
            # the prompt gives way first, down to half the budget; the response's tail goes after that
            keep = min(len(body), max(budget - len(r_ids), budget // 2))
            p_ids = head + body[len(body) - keep :] if keep > 0 else head
            r_ids = r_ids[: budget - keep]
        out.append(TeacherForced(p_ids + r_ids, len(p_ids), len(p_ids) + len(r_ids), truncated))
    return out
