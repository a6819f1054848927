"""M0: a tiny ``Olmo2ForCausalLM`` trained from scratch with TRL's ``SFTTrainer`` (loss on the responses only)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pairtrace.organism.build_config import ModelSettings, SFTSettings
from pairtrace.retrain.trl_dpo import quiet_trainer_arguments, quiet_training_logs


def build_olmo2(tokenizer: Any, settings: ModelSettings, seed: int):
    """A randomly initialised ``Olmo2ForCausalLM`` sized by ``settings`` (seeded, float32).

    Args:
        tokenizer: Gives the vocabulary size and the special-token ids.
        settings: Model size.
        seed: Initialisation seed.

    Returns:
        The model.
    """
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(config)


def train_sft(
    examples: list[dict[str, Any]],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    model_settings: ModelSettings,
    settings: SFTSettings,
    seed: int,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train M0 from scratch on prompt/completion chat examples and save it with its tokenizer.

    Args:
        examples: Records with ``prompt`` (user turn list) and ``completion`` (assistant turn list).
        tokenizer_dir: The organism tokenizer.
        out_dir: Where M0 is saved (Hugging Face format).
        model_settings: Model size.
        settings: Epochs, learning rate, batch size, maximum length.
        seed: Seed of the initialisation and the data order.
        progress: Show TRL's progress bar.

    Returns:
        Summary: ``n_examples``, ``steps``, ``train_loss``, ``n_parameters``, ``seconds``.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    quiet_training_logs()
    start = time.perf_counter()
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_olmo2(tokenizer, model_settings, seed)
    dataset = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    with tempfile.TemporaryDirectory(prefix="pairtrace-sft-") as tmp:
        args = SFTConfig(
            output_dir=tmp,
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            per_device_train_batch_size=settings.batch_size,
            max_length=settings.max_length,
            completion_only_loss=True,
            packing=False,
            train_sampling_strategy="group_by_length",  # similar lengths share a batch: little padding
            **quiet_trainer_arguments(seed, progress),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        result = trainer.train()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return {
        "n_examples": len(examples),
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "seconds": round(time.perf_counter() - start, 2),
    }
