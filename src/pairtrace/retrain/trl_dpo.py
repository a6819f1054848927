"""DPO from a checkpoint on any preference JSONL in the mix layout, through TRL's ``DPOTrainer``.

The same :func:`train_dpo` builds the organism's M1 and retrains from M0 on modified mixes (filtered, switched,
random-k, source-ablated): deterministic for a seed, so that the only difference between two retrains is the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError, DataError
from pairtrace.records import iter_jsonl, write_text_atomic
from pairtrace.retrain.recipe import LOSS_TYPES, DPORecipe

logger = logging.getLogger(__name__)

def _last_assistant(turns: Any, where: str, name: str) -> tuple[list[dict], dict]:
    """Split a message list into (prompt turns, final assistant turn)."""
    if isinstance(turns, str):
        return [], {"role": "assistant", "content": turns}
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: field '{name}' must be a string or a non-empty list of messages")
    last = turns[-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise DataError(f"{where}: field '{name}' must end with an assistant turn")
    return [dict(t) for t in turns[:-1]], {"role": "assistant", "content": last["content"]}


def load_dpo_examples(pairs_jsonl: str | Path) -> list[dict[str, Any]]:
    """Read a preference JSONL in the mix layout into TRL's conversational preference format.

    Each record needs ``chosen`` and ``rejected`` (message lists ending with the assistant turn, or strings) and,
    when they are strings or hold no user turn, a ``prompt`` (string or message list).

    Args:
        pairs_jsonl: The file.

    Returns:
        ``{"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}`` per record, in order.

    Raises:
        DataError: Malformed records (the message names the line and the field).
    """
    path = Path(pairs_jsonl)
    out: list[dict[str, Any]] = []
    for line_no, record in iter_jsonl(path):
        where = f"{path.name} line {line_no}"
        for name in ("chosen", "rejected"):
            if name not in record:
                raise DataError(f"{where}: field '{name}' is missing")
        prompt_turns, chosen = _last_assistant(record["chosen"], where, "chosen")
        _, rejected = _last_assistant(record["rejected"], where, "rejected")
        if not prompt_turns:
            prompt = record.get("prompt")
            if isinstance(prompt, str) and prompt.strip():
                prompt_turns = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and prompt:
                prompt_turns = [dict(t) for t in prompt]
            else:
                raise DataError(f"{where}: field 'prompt' is missing or empty")
        out.append({"prompt": prompt_turns, "chosen": [chosen], "rejected": [rejected]})
    if not out:
        raise DataError(f"{path}: no preference pairs")
    return out


def quiet_training_logs() -> None:
    """Keep transformers/TRL/datasets to warnings and errors (progress bars stay, if asked for)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _char_length(example: dict[str, Any]) -> int:
    """Characters of the prompt plus the longer response (a cheap proxy for the padded token length)."""
    prompt = sum(len(t["content"]) for t in example["prompt"])
    return prompt + max(len(example["chosen"][0]["content"]), len(example["rejected"][0]["content"]))


def sort_by_length(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The examples shortest first (ties in file order): with ``group_by_length``, similar lengths sit side by side,
    so the reference pass (which reads the data in order) pads little too."""
    order = sorted(range(len(examples)), key=lambda i: (_char_length(examples[i]), i))
    return [examples[i] for i in order]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sequence_key(prompt_ids: list[int], completion_ids: list[int]) -> str:
    data = ",".join(map(str, prompt_ids)) + "|" + ",".join(map(str, completion_ids))
    return hashlib.sha1(data.encode()).hexdigest()


class ReferenceCache:
    """Reference log-probabilities of tokenised (prompt, response) sequences, kept in one JSON file per reference
    model, so that retrains from the same checkpoint on overlapping or switched pairs compute each sequence once.

    Args:
        directory: Cache folder.
        identity: Identifies the reference model and tokenisation (weights fingerprint, tokenizer, max length).
    """

    def __init__(self, directory: str | Path, identity: str, *, writable: bool = True) -> None:
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.path = Path(directory) / f"ref-logps-{digest}.json"
        self.values: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.writable = writable

    def save(self) -> None:
        """Write the cache atomically (nothing when it was opened read-only, e.g. on a worker of rank > 0)."""
        if self.writable:
            write_text_atomic(json.dumps(self.values), self.path)


TESTED_TRL = "1.16.0"
"""The trl release whose ``DPOTrainer`` internals the hooks below override (pinned in pyproject.toml)."""
TRAINER_HOOKS = ("_get_train_sampler", "_precompute_ref_logps")
"""``DPOTrainer`` methods overridden below: private to trl, so checked before use."""


def _trainer_class(group_by_length: bool, cache: ReferenceCache | None, global_batch: int | None = None,
                   lm_head: str = "auto"):
    """``DPOTrainer`` with a length-grouped training sampler and a reference log-probability cache (each optional),
    scoring tokens through the LM head the recipe's ``lm_head`` picks.

    ``global_batch`` is the sampler's group size when several processes share each optimisation step (the
    recipe's batch size); by default it is this process's batch x gradient accumulation (one process).
    """
    import torch
    from accelerate.utils import is_peft_model
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOTrainer

    from pairtrace.retrain.dense_head import add_dense_lm_head, use_dense_lm_head

    missing = [hook for hook in TRAINER_HOOKS if not callable(getattr(DPOTrainer, hook, None))]
    if missing:
        import trl

        raise ConfigError(f"trl {trl.__version__}: DPOTrainer has no {missing}; pairtrace's length-grouped sampler "
                          f"and reference cache need trl {TESTED_TRL} (pip install 'trl~={TESTED_TRL}')")

    class PairtraceDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # On a CPU, a dense LM head instead of TRL's tiled one (pairtrace.retrain.dense_head)
            metrics = ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if self.use_weighting else ())
            for model, outputs in ((self.model, metrics), (self.ref_model, ())):
                if model is not None and not is_peft_model(model) and use_dense_lm_head(model, lm_head):
                    add_dense_lm_head(model, outputs)

        def _get_train_sampler(self, train_dataset=None):
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
            ]  # padded length of each pair's longer sequence
            # Its own generator: the order must not depend on whatever consumed the global RNG before (the
            # reference pass runs only when the cache misses).
            generator = torch.Generator()
            generator.manual_seed(self.args.data_seed if self.args.data_seed is not None else self.args.seed)
            group = global_batch or self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(group, lengths=lengths, generator=generator)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if cache is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            prompts = dataset["prompt_ids"]
            keys = {
                side: [_sequence_key(p, c) for p, c in zip(prompts, dataset[f"{side}_ids"], strict=True)]
                for side in ("chosen", "rejected")
            }
            missing = [
                i for i in range(len(dataset))
                if keys["chosen"][i] not in cache.values or keys["rejected"][i] not in cache.values
            ]
            if missing:
                computed = super()._precompute_ref_logps(dataset.select(missing), name, batch_size)
                for side in ("chosen", "rejected"):
                    for i, value in zip(missing, computed[f"ref_{side}_logps"], strict=True):
                        cache.values[keys[side][i]] = float(value)
                cache.save()
            for side in ("chosen", "rejected"):
                dataset = dataset.add_column(f"ref_{side}_logps", [cache.values[k] for k in keys[side]])
            return dataset

    return PairtraceDPOTrainer


def train_dpo(
    m0_dir: str | Path,
    pairs_jsonl: str | Path,
    out_dir: str | Path,
    recipe: DPORecipe | None = None,
    *,
    progress: bool = True,
    ref_cache_dir: str | Path | None = None,
    on_reference_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train a policy with DPO from ``m0_dir`` (also the frozen reference) on a preference JSONL.

    Gradient checkpointing is off and training runs in float32 on CPU (or on the GPU when one is visible);
    reference log-probabilities are precomputed once by default. Deterministic for ``recipe.seed`` on a given
    machine and thread count.

    Args:
        m0_dir: Starting checkpoint (Hugging Face format, with tokenizer).
        pairs_jsonl: Preference pairs in the mix layout (see :func:`load_dpo_examples`).
        out_dir: Where the trained model and its tokenizer are saved.
        recipe: Hyper-parameters (default :class:`DPORecipe`).
        progress: Show TRL's progress bar.
        ref_cache_dir: Folder caching the reference log-probabilities of ``m0_dir`` per tokenised sequence
            (keyed by its weights fingerprint and the tokenisation), so that repeated retrains from the same
            checkpoint compute each sequence once. ``None`` computes them every time.
        on_reference_ready: Called once the reference log-probabilities of every pair are computed (and saved
            to ``ref_cache_dir``), before training starts.

    Returns:
        Summary: ``n_pairs``, ``steps``, ``train_loss``, ``seconds``, ``recipe``, ``ref_cached`` (whether a
        reference cache was used).

    Raises:
        DataError: Malformed pairs.
    """
    import torch

    recipe = recipe or DPORecipe()
    previous_threads = torch.get_num_threads()
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)
    try:
        return _run_dpo(Path(m0_dir), Path(pairs_jsonl), Path(out_dir), recipe, progress, ref_cache_dir,
                        on_reference_ready)
    finally:
        torch.set_num_threads(previous_threads)


def _dpo_config(recipe: DPORecipe, output_dir: str, progress: bool, **overrides: Any):
    """TRL's ``DPOConfig`` for a recipe: float32, no gradient checkpointing, no saving or logging (``overrides``:
    other ``DPOConfig`` arguments, e.g. a distributed run's per-device batch and accumulation)."""
    from trl import DPOConfig

    arguments = dict(
        output_dir=output_dir,
        loss_type=[LOSS_TYPES[recipe.loss_type], *(["sft"] if recipe.sft_weight else [])],
        loss_weights=[1.0, recipe.sft_weight] if recipe.sft_weight else None,
        beta=recipe.beta,
        label_smoothing=recipe.label_smoothing,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        precompute_ref_log_probs=recipe.precompute_ref_log_probs,
        precompute_ref_batch_size=max(64, recipe.batch_size),
        max_length=recipe.max_length,
        **quiet_trainer_arguments(recipe.seed, progress),
    )
    return DPOConfig(**{**arguments, **overrides})


def quiet_trainer_arguments(seed: int, progress: bool) -> dict[str, Any]:
    """Trainer arguments shared by the organism's SFT and DPO runs: seeded data order, float32, no gradient
    checkpointing, GPU when one is visible, and nothing saved, logged or reported."""
    import torch

    return {
        "seed": seed,
        "data_seed": seed,
        "gradient_checkpointing": False,
        "bf16": False,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": not progress,
        "dataloader_num_workers": 0,
    }


def _reference_cache(m0_dir: Path, tokenizer: Any, recipe: DPORecipe, ref_cache_dir: str | Path | None,
                     writable: bool = True):
    """The reference log-probability cache of ``m0_dir``, or ``None`` (not asked for, or no local weights)."""
    if ref_cache_dir is None or not recipe.precompute_ref_log_probs:
        return None
    from pairtrace.models import compute_template_hash, compute_weights_fingerprint

    weights = compute_weights_fingerprint(m0_dir) if m0_dir.is_dir() else None
    if weights is None:
        logger.warning("no local weights to fingerprint for %s: reference log-probs are not cached", m0_dir)
        return None
    identity = json.dumps([
        weights, compute_template_hash("chat", tokenizer.chat_template),
        _sha256_text(tokenizer.backend_tokenizer.to_str()), recipe.max_length,
    ])
    return ReferenceCache(ref_cache_dir, identity, writable=writable)


def _run_dpo(
    m0_dir: Path, pairs_jsonl: Path, out_dir: Path, recipe: DPORecipe, progress: bool,
    ref_cache_dir: str | Path | None, on_reference_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from pairtrace.retrain.weight_average import add_weight_average

    quiet_training_logs()
    start = time.perf_counter()
    examples = load_dpo_examples(pairs_jsonl)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(m0_dir))
    model = AutoModelForCausalLM.from_pretrained(str(m0_dir), dtype=torch.float32)
    cache = _reference_cache(m0_dir, tokenizer, recipe, ref_cache_dir)
    if recipe.group_by_length:
        examples = sort_by_length(examples)
    with tempfile.TemporaryDirectory(prefix="pairtrace-dpo-") as tmp:
        trainer = _trainer_class(recipe.group_by_length, cache, lm_head=recipe.lm_head)(
            model=model, args=_dpo_config(recipe, tmp, progress), train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
        )  # the reference pass runs here
        add_weight_average(trainer, recipe.ema_decay)
        if on_reference_ready is not None:
            on_reference_ready()
        result = trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "n_pairs": len(examples),
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "seconds": round(time.perf_counter() - start, 2),
        "recipe": asdict(recipe),
        "ref_cached": cache is not None,
    }
    (out_dir / "dpo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
