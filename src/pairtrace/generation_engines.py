"""One entry point for sampling responses, whichever engine runs it: Hugging Face ``generate`` or vLLM.

:func:`generate_with` takes a loaded model or a :class:`~pairtrace.models.ModelSpec` and a
:class:`~pairtrace.generate.GenerationConfig`; its ``backend`` (``auto`` | ``hf`` | ``vllm``) picks the engine
(:func:`resolve_engine`). Both engines write the same generation records from the same prompt text
(:func:`pairtrace.models.format_prompt`, then the same tokenisation), the same sampling parameters, stop tokens
and decoding; the seeds are derived by one function (``generate._batch_seed``): per batch on Hugging Face, per
request on vLLM. vLLM loads the weights itself, so it needs a spec (path, revision, dtype), never a loaded model:
pass a spec and the Hugging Face weights are never loaded for a vLLM generation.

    engine = resolve_engine(config.backend, device="cuda")       # "vllm" or "hf"
    records = generate_with(spec, prompt_records, config, model_name="m0", engine=engine)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pairtrace.errors import ConfigError

if TYPE_CHECKING:
    from pairtrace.generate import GenerationConfig

BACKENDS = ("auto", "hf", "vllm")
"""Values of ``GenerationConfig.backend``: ``generation.backend`` in a run config, ``--backend`` on the CLI."""

ENGINES = ("hf", "vllm")
"""Engines a backend resolves to."""


def vllm_usable() -> bool:
    """Whether vLLM imports and a CUDA GPU is present (:func:`pairtrace.vllm_backend.vllm_available`)."""
    from pairtrace.vllm_backend import vllm_available

    return vllm_available()


def resolve_engine(backend: str, device: str = "auto", *, key: str = "generation.backend") -> str:
    """The engine a backend setting runs on this machine.

    Args:
        backend: ``auto`` (vLLM when it imports and a CUDA GPU is present, unless the models are pinned to the
            CPU; Hugging Face otherwise), ``hf`` or ``vllm``.
        device: The models' device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        key: The name the user set the backend by, for messages (``generation.backend`` or ``--backend``).

    Returns:
        ``"hf"`` or ``"vllm"``.

    Raises:
        ConfigError: An unknown backend, or ``vllm`` where vLLM or a GPU is missing or the models are pinned to
            the CPU (the message names ``key`` and the fix).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"{key} must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return "hf"
    on_cpu = device == "cpu"
    if backend == "auto":
        return "hf" if on_cpu or not vllm_usable() else "vllm"
    if on_cpu:
        raise ConfigError(f"{key} is 'vllm' but the models' device is 'cpu': vLLM runs on a CUDA GPU; "
                          f"set {key}: hf (or auto) to sample with Hugging Face on the CPU")
    if not vllm_usable():
        raise ConfigError(f"{key} is 'vllm' but vLLM cannot run on this machine (it needs the vllm package and "
                          f"a CUDA GPU): install vllm on a GPU machine, or set {key}: hf (or auto, which falls "
                          "back to Hugging Face)")
    return "vllm"


def vllm_dtype(dtype: str) -> str:
    """The vLLM dtype of a :class:`~pairtrace.models.ModelSpec` dtype: the same name; ``auto`` as the Hugging
    Face loader resolves it on a GPU (bfloat16 where supported, float32 otherwise), not vLLM's own ``auto``
    (which follows the checkpoint's config)."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def generate_with(
    model: Any,
    prompt_records: Sequence[dict[str, Any]],
    config: GenerationConfig,
    *,
    model_name: str,
    engine: str | None = None,
    progress: bool = True,
    skip: Iterable[tuple[str, str, int]] = (),
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample ``config.n_samples`` responses per prompt record with the configured engine.

    Args:
        model: A :class:`~pairtrace.models.LoadedModel` or a :class:`~pairtrace.models.ModelSpec`. Hugging Face
            loads a spec with :func:`pairtrace.models.load_model`; vLLM reads the spec's path, revision, dtype
            and chat template (of a loaded model, its ``spec``: the weights are then in memory twice; pass the
            spec instead).
        prompt_records: Prompt records (``id`` and ``prompt`` required).
        config: Sampling settings; ``config.backend`` chooses the engine unless ``engine`` is given.
        model_name: The records' ``model`` field.
        engine: ``hf`` or ``vllm``, already resolved (e.g. once per run); default: :func:`resolve_engine` of
            ``config.backend`` and the spec's device.
        progress: Show a progress bar.
        skip: Keys ``(id, model, sample)`` already generated.
        on_batch: Called with each finished group of records.

    Returns:
        The new generation records, in prompt order then sample order (the same layout on both engines).

    Raises:
        ConfigError: An unknown engine, or vLLM where it cannot run.
    """
    from pairtrace.models import LoadedModel, ModelSpec, as_loaded_model

    spec = model.spec if isinstance(model, LoadedModel) else model
    if engine is None:
        device = spec.device if isinstance(spec, ModelSpec) else "auto"
        engine = resolve_engine(config.backend, device, key="backend")
    if engine == "hf":
        from pairtrace.generate import generate_responses

        return generate_responses(as_loaded_model(model, "generate_with"), prompt_records, config,
                                  model_name=model_name, progress=progress, skip=skip, on_batch=on_batch)
    if engine != "vllm":
        raise ConfigError(f"generation engine must be one of {list(ENGINES)}, got {engine!r}")
    if not isinstance(spec, ModelSpec):
        raise ConfigError("generate_with: vLLM needs a ModelSpec (or a LoadedModel with its spec), got "
                          f"{type(model).__name__}")
    from pairtrace.vllm_backend import generate_responses_vllm

    return generate_responses_vllm(
        spec.name_or_path, prompt_records, config, model_name=model_name, revision=spec.revision,
        dtype=vllm_dtype(spec.dtype), chat_template=spec.chat_template, trust_remote_code=spec.trust_remote_code,
        progress=progress, skip=skip, on_batch=on_batch,
    )


__all__ = ["BACKENDS", "ENGINES", "generate_with", "resolve_engine", "vllm_dtype", "vllm_usable"]
