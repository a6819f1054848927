"""The DPO recipe: one set of hyper-parameters shared by M1's build and every retrain from M0."""

from __future__ import annotations

from dataclasses import dataclass, field

from pairtrace.options import OptionError

LOSS_TYPES = {"sigmoid": "sigmoid", "dpo_norm": "sigmoid_norm", "ipo": "ipo", "robust": "robust", "hinge": "hinge"}
"""Recipe loss name -> TRL loss type. ``dpo_norm`` is TRL's ``sigmoid_norm``: the DPO loss on the *average*
per-token log-ratio of each response (length-normalised, as in OLMo 2 / Tülu 3's ``dpo_norm``). ``ipo`` is IPO
(Azar et al.): the squared distance of the per-token log-ratio margin from ``1 / (2 beta)``. ``robust`` is rDPO
(Chowdhury et al.): the DPO loss made unbiased for labels flipped at the rate ``label_smoothing``. ``hinge`` is
SLiC's hinge loss (Zhao et al.): ``max(0, 1 - beta * margin)``, so a pair stops teaching once ``beta`` times its
log-ratio margin reaches 1, while a pair the model gets wrong pulls with the same constant weight."""

LM_HEADS = ("auto", "dense", "fused")
"""How DPO scores tokens: pairtrace's dense LM head, TRL's fused one, or the dense one where it applies
(:mod:`pairtrace.retrain.dense_head`)."""


@dataclass
class DPORecipe:
    """Hyper-parameters of one DPO run."""

    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (standard DPO), dpo_norm (length-normalised log-ratios, TRL sigmoid_norm), ipo "
                  "(IPO), robust (rDPO, with label_smoothing) or hinge (SLiC: max(0, 1 - beta * margin))."},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta (deviation penalty from the reference)."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "robust: the share of flipped preference labels the loss corrects for, in [0, 0.5)."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an added NLL loss on the chosen responses (TRL loss 'sft', as in RPO); 0 = off."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Learning-rate schedule (transformers names: linear, cosine, constant...)."}
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear warm-up."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the pairs."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per optimisation step."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order (the run is deterministic for it)."})
    max_length: int = field(default=256, metadata={"help": "Longest prompt + response, in tokens."})
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Compute the reference log-probabilities once before training (faster)."}
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "Batch pairs of similar length together (much less padding on CPU)."}
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch during training (None keeps the process setting; 1 is fastest on "
                  "a busy shared CPU)."},
    )
    lm_head: str = field(
        default="auto",
        metadata={"help": "How training scores tokens: dense (one log_softmax over the labelled positions, fastest "
                  "on a CPU), fused (TRL's tiled head, which never holds the [tokens, vocabulary] logits: for a GPU "
                  "and large vocabularies) or auto (dense on a CPU for vocabularies up to 65,536 tokens and plain "
                  "logits, else fused)."},
    )

    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Save an exponential moving average of the weights over the run instead of the last step's "
                  "(horizon about 1 / (1 - ema_decay) steps; steadier across data orders with a constant learning "
                  "rate); 0 = off. Costs 4 bytes per trainable parameter; not under DeepSpeed or FSDP."},
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise OptionError(f"{{loss_type}}: {self.loss_type!r} is not one of {sorted(LOSS_TYPES)}", "loss_type")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise OptionError(f"{{label_smoothing}} must lie in [0, 0.5), got {self.label_smoothing}",
                              "label_smoothing")
        if self.label_smoothing and self.loss_type != "robust":
            raise OptionError(f"{{label_smoothing}} is an option of loss_type robust; the {self.loss_type} loss would "
                              "ignore it", "label_smoothing")
        if self.lm_head not in LM_HEADS:
            raise OptionError(f"{{lm_head}}: {self.lm_head!r} is not one of {list(LM_HEADS)}", "lm_head")
        if not 0.0 <= self.ema_decay < 1.0:
            raise OptionError(f"{{ema_decay}} must lie in [0, 1), got {self.ema_decay}", "ema_decay")
        if self.sft_weight < 0:
            raise OptionError(f"{{sft_weight}} must be >= 0, got {self.sft_weight}", "sft_weight")
        for name in ("batch_size", "epochs", "learning_rate", "beta"):
            if getattr(self, name) <= 0:
                raise OptionError(f"{{{name}}} must be positive, got {getattr(self, name)}", name)
