"""Which model to load and how (:class:`ModelSpec`): plain settings, importable without torch.

The command line builds its options from this dataclass, so ``pairtrace --help`` stays fast; the loader itself is
:func:`pairtrace.models.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pairtrace.options import OptionError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Weight dtypes a model can be loaded in (besides ``auto``); ``models.DTYPES`` maps them to torch dtypes."""
TEMPLATE_MODES = ("auto", "chat", "plain")


@dataclass
class ModelSpec:
    """Which model to load and how."""

    name_or_path: str = field(metadata={"help": "Local directory or Hugging Face hub id of the model."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype: float32, bfloat16, float16, or auto (bfloat16 on a GPU that supports it "
                          "and on a CPU with AMX, else float32)."},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda or cuda:N."})
    chat_template: str = field(
        default="auto",
        metadata={"help": "auto (the tokenizer's template if it has one, else plain), chat, or plain."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub (off unless asked)."}
    )

    def __post_init__(self) -> None:
        self.name_or_path = str(self.name_or_path)
        if self.dtype not in DTYPE_NAMES and self.dtype != "auto":
            raise OptionError(f"{{dtype}}: {self.dtype!r} is not one of {[*sorted(DTYPE_NAMES), 'auto']}", "dtype")
        if self.chat_template not in TEMPLATE_MODES:
            raise OptionError(f"{{chat_template}}: {self.chat_template!r} is not one of {list(TEMPLATE_MODES)}",
                              "chat_template")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise OptionError(f"{{device}}: {self.device!r} is not auto, cpu, cuda or cuda:N", "device")
