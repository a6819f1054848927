"""One process of an ``accelerate`` retrain: ``python -m pairtrace.retrain.accelerate_worker REQUEST.json``.

``accelerate launch`` starts N of these (:mod:`pairtrace.retrain.accelerate_engine` writes the request). Each runs
TRL's ``DPOTrainer`` with the recipe of the in-process engine; DDP, DeepSpeed or FSDP come from the launcher's
accelerate config. What keeps a distributed retrain equal to the in-process one:

- **The same data order.** Every rank sorts the pairs by length and draws the same length-grouped order from the
  same seeded generator, in groups of the recipe's (global) batch size. Accelerate hands the per-device batches of
  that one index stream to the ranks in turn, so optimisation step s trains on exactly the pairs of the in-process
  run's step s.
- **The same update.** The recipe's batch is split as per-device batch x processes x gradient accumulation (all
  equal shares). DPO's loss is a mean over the pairs of a batch, the trainer divides it by the accumulation steps
  and DDP averages gradients over ranks, so the step's gradient is the same mean, up to float reduction order.
- **The same reference log-probabilities.** Read from the run's reference cache when it has them (rank 0 adds the
  ones it lacks); otherwise TRL computes them once, spread over the ranks.

Exactness needs the number of pairs to be a multiple of the batch: accelerate fills the last, incomplete global
batch up with pairs from the start of the epoch so that every rank gets equal batches (a warning says so).
Rank 0 saves the model folder (with the tokenizer) and the summary JSON the parent reads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.retrain.engine_options import RetrainEngineOptions
from pairtrace.retrain.recipe import DPORecipe

logger = logging.getLogger("pairtrace.retrain.accelerate_worker")


def batch_split(batch_size: int, world_size: int, per_device: int | None) -> tuple[int, int]:
    """Split the recipe's global batch into (per-device batch, gradient accumulation steps).

    Args:
        batch_size: The recipe's pairs per optimisation step.
        world_size: Training processes.
        per_device: The ``per_device_batch_size`` option (None: ``batch_size / world_size``).

    Raises:
        ConfigError: The batch cannot be split exactly (the message names the options).
    """
    if per_device is None:
        if batch_size % world_size:
            raise ConfigError(
                f"recipe batch_size {batch_size} cannot be split over {world_size} processes: choose a batch size "
                f"divisible by num_processes, or set per_device_batch_size so that batch_size = "
                "per_device_batch_size x num_processes x gradient accumulation")
        return batch_size // world_size, 1
    if batch_size % (per_device * world_size):
        raise ConfigError(
            f"recipe batch_size {batch_size} is not per_device_batch_size {per_device} x num_processes {world_size} "
            "x a whole number of gradient accumulation steps: choose per_device_batch_size and num_processes whose "
            f"product divides {batch_size}")
    return per_device, batch_size // (per_device * world_size)


def resolve_precision(mixed_precision: str, on_gpu: bool) -> str:
    """``no``, ``bf16`` or ``fp16`` for this machine: ``auto`` is bf16 on a GPU that supports it, else ``no``.

    Raises:
        ConfigError: fp16 asked for without a GPU.
    """
    if mixed_precision == "auto":
        import torch

        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    return mixed_precision


def run_worker(request: dict[str, Any]) -> dict[str, Any] | None:
    """Train one retrain as this process's share; rank 0 saves the model and returns the summary (else None)."""
    import torch
    from datasets import Dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from pairtrace.retrain.trl_dpo import (
        _dpo_config,
        _reference_cache,
        _trainer_class,
        load_dpo_examples,
        quiet_training_logs,
        sort_by_length,
    )
    from pairtrace.retrain.weight_average import add_weight_average

    start = time.perf_counter()
    recipe = DPORecipe(**request["recipe"])
    options = RetrainEngineOptions(**request["options"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available()
    per_device, accumulation = batch_split(recipe.batch_size, world_size, options.per_device_batch_size)
    precision = resolve_precision(options.mixed_precision, on_gpu)
    if options.mixed_precision != "auto":
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # the option wins over an accelerate config file's
    threads = recipe.torch_threads or (None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    quiet_training_logs()
    m0_dir, model_dir = Path(request["m0"]), Path(request["model_dir"])
    examples = load_dpo_examples(request["train_file"])
    if recipe.group_by_length:
        examples = sort_by_length(examples)
    if rank == 0:
        logger.info("%d pairs, %d processes, per-device batch %d x accumulation %d = %d pairs per step, %s",
                    len(examples), world_size, per_device, accumulation, recipe.batch_size,
                    "float32" if precision == "no" else precision)
        if len(examples) % recipe.batch_size:
            logger.warning("%d pairs is not a multiple of batch_size %d: the last step's batch is filled up with "
                           "pairs from the start of the epoch (one batch per rank), unlike the in-process engine",
                           len(examples), recipe.batch_size)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(m0_dir))
    with tempfile.TemporaryDirectory(prefix="pairtrace-dpo-") as tmp:
        # The arguments before the model: under DeepSpeed ZeRO-3 they make from_pretrained load it sharded.
        args = _dpo_config(
            recipe, tmp, bool(request.get("progress")) and rank == 0,
            per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
            gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_gpu,
            precompute_ref_batch_size=max(64, per_device),
        )
        # One copy of the pairs on disk that every rank reads: the datasets caches of the tokenisation and of the
        # reference pass then live in one shared folder (an in-memory dataset's are private to each process).
        data_dir = Path(request["work_dir"]) / "pairs"
        with args.main_process_first(local=False, desc="pairs on disk"):
            if rank == 0:
                Dataset.from_list(examples).save_to_disk(str(data_dir))
            dataset = load_from_disk(str(data_dir))
        model = AutoModelForCausalLM.from_pretrained(str(m0_dir), dtype=torch.float32)
        ref_cache_dir = request.get("ref_cache_dir")
        cache = _reference_cache(m0_dir, tokenizer, recipe, ref_cache_dir, writable=rank == 0)
        trainer = _trainer_class(recipe.group_by_length, cache, global_batch=recipe.batch_size,
                                 lm_head=recipe.lm_head)(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        )
        add_weight_average(trainer, recipe.ema_decay)
        result = trainer.train()
        # Each rank's training loss is the mean over its equal shares of every batch: their mean is the run's.
        local = torch.tensor([float(result.training_loss)], dtype=torch.float64, device=trainer.accelerator.device)
        train_loss = float(trainer.accelerator.gather(local).mean())
        trainer.save_model(str(model_dir))  # gathers ZeRO-3 / FSDP shards; writes on the main process only
    if rank != 0:
        return None
    tokenizer.save_pretrained(model_dir)
    summary = {
        "n_pairs": len(examples),
        "steps": int(result.global_step),
        "train_loss": train_loss,
        "seconds": round(time.perf_counter() - start, 2),
        "recipe": asdict(recipe),
        "ref_cached": cache is not None,
        "num_processes": world_size,
        "per_device_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "mixed_precision": precision,
        "gradient_checkpointing": options.gradient_checkpointing,
    }
    (model_dir / "dpo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the request JSON, train, and (rank 0) write the summary file it names."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pairtrace.retrain.accelerate_worker REQUEST.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    request = json.loads(Path(argv[0]).read_text())
    summary = run_worker(request)
    if summary is not None:
        from pairtrace.records import write_json_atomic

        write_json_atomic(summary, request["summary_file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
