"""How a retrain runs: the engine and its options, defined once (the run config's ``validation.retrain`` section
and ``pairtrace retrain``'s flags are this dataclass's fields).

    validation:
      retrain: {engine: accelerate, num_processes: 8, accelerate_config: configs/zero3.yaml}
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from typing import Any

from pairtrace.options import OptionError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
"""``mixed_precision`` values: ``auto`` is bf16 on a GPU that supports it and float32 elsewhere."""

COMMAND_PLACEHOLDERS = {
    "m0": "M0's folder or hub id (the starting checkpoint and the frozen reference)",
    "train_file": "the pairs as conversational JSONL (prompt + chosen / rejected message lists)",
    "train_dir": "a folder holding train.jsonl and the open-instruct export (open_instruct/preference_data.jsonl, "
                 "open_instruct/dataset_mixer_list.txt)",
    "mixer_list": "open-instruct's dataset mixer file (open_instruct/preference_data.jsonl), for "
                  "--dataset_mixer_list {mixer_list} 1.0",
    "model_dir": "where the trained model folder (weights, config, tokenizer) must be left",
    "summary_file": "an optional JSON summary the command may write (n_pairs, steps, train_loss)",
    "retrain_dir": "the retrain's folder (request, log)",
    "seed": "the recipe's seed (this retrain's DPO seed)",
    "beta": "DPO beta",
    "learning_rate": "peak learning rate",
    "lr_scheduler_type": "learning-rate schedule",
    "warmup_ratio": "share of warm-up steps",
    "batch_size": "pairs per optimisation step (the global batch)",
    "epochs": "passes over the pairs",
    "max_length": "longest prompt + response, in tokens",
    "loss_type": "the recipe's loss: sigmoid, dpo_norm, ipo, robust or hinge",
    "label_smoothing": "the robust loss's share of flipped labels",
    "sft_weight": "weight of the added NLL loss on chosen responses",
    "ema_decay": "decay of the moving average of the weights to save (0: the last step's weights)",
    "num_processes": "the num_processes option (1 when unset)",
}
"""The placeholders a ``command`` template may use, each filled from the retrain request."""

_ACCELERATE_ONLY = ("num_processes", "per_device_batch_size", "accelerate_config", "launcher_args")


def command_placeholders(template: str) -> list[str]:
    """The ``{name}`` placeholders of a command template, in order (``{{`` and ``}}`` are literal braces).

    Raises:
        ValueError: The template's braces do not parse.
    """
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass
class RetrainEngineOptions:
    """How each retrain from M0 runs: in this process, under ``accelerate launch``, or as a user command."""

    engine: str = field(
        default="inprocess",
        metadata={"help": "inprocess (TRL's DPOTrainer in this process, float32: the organism's engine), accelerate "
                  "(TRL's DPOTrainer under 'accelerate launch' on N processes: DDP, DeepSpeed or FSDP), command "
                  "(a user command template, e.g. open-instruct's DPO script), or an engine registered with "
                  "pairtrace.retrain.engines.register_retrainer."},
    )
    num_processes: int | None = field(
        default=None,
        metadata={"help": "accelerate: training processes (default: the accelerate config file's, else one per "
                  "visible GPU, else 1). On a CPU-only machine N processes use the gloo backend."},
    )
    per_device_batch_size: int | None = field(
        default=None,
        metadata={"help": "accelerate: pairs per process per forward pass; gradient accumulation makes up the "
                  "recipe's batch_size = per_device_batch_size x processes x accumulation (default: batch_size / "
                  "processes, no accumulation)."},
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate: an accelerate config file (DeepSpeed ZeRO-3, FSDP, ...) passed to "
                  "'accelerate launch --config_file'."},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "accelerate: auto (bf16 on a GPU that supports it, float32 on CPU), no, bf16 or fp16."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "accelerate: recompute activations in the backward pass (less memory)."}
    )
    launcher_args: list[str] = field(
        default_factory=list,
        metadata={"help": "accelerate: extra arguments for 'accelerate launch' (e.g. ['--main_process_port', "
                  "'29600'])."},
    )
    command: str | None = field(
        default=None,
        metadata={"help": "command: the training command template; placeholders {m0} {train_file} {train_dir} "
                  "{mixer_list} {model_dir} {summary_file} {retrain_dir} {seed} {beta} {learning_rate} "
                  "{lr_scheduler_type} {warmup_ratio} {batch_size} {epochs} {max_length} {loss_type} {label_smoothing} "
                  "{sft_weight} {ema_decay} {num_processes}. Split like a shell line, then each argument is filled "
                  "(no shell)."},
    )
    shell: bool = field(
        default=False,
        metadata={"help": "command: run the template through /bin/sh (values shell-quoted), for pipes, && or "
                  "environment assignments."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.engine, str) or not self.engine:
            raise OptionError(f"{{engine}} must be an engine name, got {self.engine!r}", "engine")
        if self.mixed_precision not in MIXED_PRECISION:
            raise OptionError(f"{{mixed_precision}}: {self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}",
                              "mixed_precision")
        for name in ("num_processes", "per_device_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"{{{name}}} must be a positive integer, got {value!r}", name)
        self.launcher_args = [str(a) for a in (self.launcher_args or [])]
        if self.engine == "command":
            if not self.command or not str(self.command).strip():
                raise OptionError("the command engine needs {command} (the training command template)", "command")
            try:
                names = command_placeholders(self.command)
            except ValueError as exc:
                raise OptionError(f"{{command}}: the template's braces do not parse ({exc}); write literal braces "
                                  "as {{{{ and }}}}", "command") from None
            unknown = [n for n in names if n not in COMMAND_PLACEHOLDERS]
            if unknown:
                raise OptionError(f"{{command}}: unknown placeholder {{{{{unknown[0]}}}}}; known: "
                                  f"{sorted(COMMAND_PLACEHOLDERS)}", "command")
        elif self.command is not None:
            raise OptionError(f"{{command}} is an option of the command engine, not of {self.engine!r}", "command")
        if self.engine in ("inprocess", "command"):
            unset = {"mixed_precision": "auto", "gradient_checkpointing": False, "launcher_args": []}
            for name in (*_ACCELERATE_ONLY, "mixed_precision", "gradient_checkpointing"):
                if getattr(self, name) != unset.get(name):
                    raise OptionError(f"{{{name}}} is an option of the accelerate engine, not of {self.engine!r}",
                                      name)

    def key_material(self) -> Any:
        """What a retrain's cache key takes from these options: the engine name alone for ``inprocess`` (so that
        existing in-process retrains stay cached), else every option of the engine."""
        if self.engine == "inprocess":
            return "inprocess"
        return asdict(self)
