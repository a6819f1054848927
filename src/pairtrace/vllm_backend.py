"""Sampling M0/M1 responses with vLLM when it is installed and a GPU is present (Hugging Face otherwise).

:func:`generate_responses_vllm` writes the same generation records as
:func:`pairtrace.generate.generate_responses`: the prompt is formatted and tokenised by the same code (chat
template, one BOS), the response is cut at the first EOS / end-of-turn token and decoded the same way, and each
sample has its own seed derived from the run seed, the prompt id and the sample index, so a run is reproducible
and resumable. vLLM's sampler is not Hugging Face's: the same seed gives other (equally distributed) samples.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtrace.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pairtrace.generate import GenerationConfig

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vLLM can be used here: it imports and CUDA is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install (e.g. a CUDA mismatch) is the same as none
        return False
    return True


@dataclass
class _Formatter:
    """The parts of a loaded model that prompt formatting and stop tokens read (no weights)."""

    tokenizer: Any
    template_mode: str
    prepend_bos: bool
    model: Any


def _formatter(model_path: str, revision: str | None, chat_template: str,
               trust_remote_code: bool = False) -> _Formatter:
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from transformers import GenerationConfig as HFGenerationConfig

    from pairtrace.models import _resolve_template_mode, _tokenizer_prepends_bos

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    try:
        generation_config = HFGenerationConfig.from_pretrained(model_path, revision=revision)
    except OSError:  # no generation_config.json: the tokenizer's tokens decide
        generation_config = None
    return _Formatter(
        tokenizer=tokenizer,
        template_mode=_resolve_template_mode(chat_template, tokenizer, model_path),
        prepend_bos=_tokenizer_prepends_bos(tokenizer),
        model=SimpleNamespace(generation_config=generation_config),
    )


def generate_responses_vllm(
    model_path: str | Path,
    prompt_records: Sequence[dict[str, Any]],
    config: GenerationConfig,
    *,
    model_name: str,
    revision: str | None = None,
    dtype: str = "bfloat16",
    chat_template: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
    skip: Iterable[tuple[str, str, int]] = (),
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    requests_per_call: int = 1024,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
) -> list[dict[str, Any]]:
    """Sample ``config.n_samples`` responses per prompt record with vLLM.

    Same inputs and records as :func:`pairtrace.generate.generate_responses`, except that the model is named by
    path (vLLM loads it itself).

    Args:
        model_path: Model directory or hub id.
        prompt_records: Prompt records (``id`` and ``prompt`` required; every field is copied).
        config: A :class:`pairtrace.generate.GenerationConfig`.
        model_name: Value of the records' ``model`` field.
        revision: Hub revision.
        dtype: Weights dtype for vLLM.
        chat_template: ``auto``, ``chat`` or ``plain`` (as :class:`pairtrace.models.ModelSpec`).
        trust_remote_code: Allow custom modelling code from the hub.
        progress: Show a progress bar.
        skip: Keys ``(id, model, sample)`` already generated.
        on_batch: Called with each finished group of records (e.g. to append them to a file).
        requests_per_call: Requests handed to vLLM per call (vLLM batches them itself); records are delivered
            to ``on_batch`` after each call.
        tensor_parallel_size: GPUs per model replica.
        gpu_memory_utilization: Fraction of the GPU's memory vLLM may take (weights and KV cache); default
            :func:`free_memory_fraction` (90% of what is free now, so a model already loaded in this process
            keeps its memory). The engine is shut down and its memory freed before this function returns.

    Returns:
        The new generation records, in prompt order then sample order.

    Raises:
        ConfigError: vLLM cannot run here (see :func:`vllm_available`).
        DataError: A prompt record without ``id`` or ``prompt``.
    """
    if not vllm_available():
        raise ConfigError("vLLM generation needs the vllm package and a CUDA GPU; use the Hugging Face backend")
    from vllm import LLM

    from pairtrace.generate import _encode_prompts, _stop_token_ids

    for i, record in enumerate(prompt_records):
        for name in ("id", "prompt"):
            if name not in record:
                raise DataError(f"prompt record {i + 1}: field '{name}' is missing")
    done = set(skip)
    items = [
        (i, s)
        for i, record in enumerate(prompt_records)
        for s in range(config.n_samples)
        if (str(record["id"]), model_name, s) not in done
    ]
    if not items:
        return []
    path = str(model_path)
    shell = _formatter(path, revision, chat_template, trust_remote_code)
    needed = sorted({i for i, _ in items})
    encoded = dict(zip(needed, _encode_prompts(shell, [prompt_records[i] for i in needed]), strict=True))
    stop_ids = _stop_token_ids(shell)
    if gpu_memory_utilization is None:
        gpu_memory_utilization = free_memory_fraction()
    llm = LLM(model=path, tokenizer=path, revision=revision, dtype=dtype, seed=config.seed,
              trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
              gpu_memory_utilization=gpu_memory_utilization)
    try:
        return _generate(llm, shell, encoded, stop_ids, items, prompt_records, config, model_name=model_name,
                         progress=progress, on_batch=on_batch, requests_per_call=requests_per_call)
    finally:
        release_engine(llm)


def _generate(llm: Any, shell: _Formatter, encoded: dict[int, list[int]], stop_ids: list[int],
              items: list[tuple[int, int]], prompt_records: Sequence[dict[str, Any]], config: GenerationConfig, *,
              model_name: str, progress: bool, on_batch: Callable[[list[dict[str, Any]]], None] | None,
              requests_per_call: int) -> list[dict[str, Any]]:
    """Run the requests through a started engine, in groups; the records of :func:`generate_responses_vllm`."""
    from tqdm.auto import tqdm
    from vllm import SamplingParams

    from pairtrace.generate import _batch_seed

    greedy = config.temperature == 0
    tok = shell.tokenizer
    results: dict[tuple[int, int], dict[str, Any]] = {}
    groups = [items[g : g + requests_per_call] for g in range(0, len(items), requests_per_call)]
    for group in tqdm(groups, desc=f"generate {model_name} (vllm)", disable=not progress, unit="call"):
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else config.temperature,
                top_p=1.0 if greedy else config.top_p,
                max_tokens=config.max_new_tokens,
                stop_token_ids=stop_ids,
                # one request = one (prompt, sample): seeded as the Hugging Face path seeds a batch whose first
                # item it is
                seed=_batch_seed(config.seed, (str(prompt_records[i]["id"]), s)),
            )
            for i, s in group
        ]
        prompts = [{"prompt_token_ids": encoded[i]} for i, _ in group]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        finished = []
        for (i, s), output in zip(group, outputs, strict=True):
            ids = list(output.outputs[0].token_ids)
            stop_at = next((j for j, t in enumerate(ids) if t in stop_ids), None)
            ended = stop_at is not None or output.outputs[0].finish_reason == "stop"
            results[(i, s)] = {
                **prompt_records[i],
                "model": model_name,
                "sample": s,
                "response": tok.decode(ids if stop_at is None else ids[:stop_at], skip_special_tokens=True),
                "seed": config.seed,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens,
                "finish_reason": "eos" if ended else "length",
            }
            finished.append(results[(i, s)])
        if on_batch is not None:
            on_batch(finished)
    return [results[key] for key in sorted(results)]


def free_memory_fraction(share_of_free: float = 0.9) -> float:
    """The ``gpu_memory_utilization`` that gives vLLM ``share_of_free`` of the GPU memory free now (vLLM counts
    the fraction of the whole device, and refuses to start when that much is not free)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return max(0.05, min(0.95, share_of_free * free / total))


def release_engine(llm: Any) -> None:
    """Shut a vLLM engine down and free its GPU memory, so the next stage (or the next model) can load."""
    import contextlib
    import gc

    import torch

    with contextlib.suppress(Exception):  # the helpers moved between vLLM versions; freeing is best effort
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    engine = getattr(llm, "llm_engine", None)
    with contextlib.suppress(Exception):
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["free_memory_fraction", "generate_responses_vllm", "release_engine", "vllm_available"]
