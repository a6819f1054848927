"""The resource plan of a run (``pairtrace run CONFIG --dry-run``): tokens, peak GPU memory per process and
GPU-hours of every stage, from the model's ``config.json`` alone (no weights are read), refusing a recipe that
cannot fit.

Everything here is arithmetic on shapes; the numbers are estimates, and each says what it assumes:

- **Architecture** (:func:`load_architecture`): a local folder's ``config.json``, the Hugging Face cache's copy, a
  shipped file (``pairtrace/data/architectures/``, e.g. OLMo-2-1124-7B), or ``ResourceOptions.architecture``.
- **Tokens**: lengths sampled from the pairs when they are a local JSONL file (characters / ``chars_per_token``);
  otherwise the stated typical lengths (``ResourceOptions.prompt_tokens``, ``response_tokens``).
- **FLOPs per token** of a forward pass through ``k`` decoder blocks (``P_k`` = their matrix parameters, ``c`` the
  token's causal context): ``2 P_k + 4 k d c``, plus ``2 d V`` when the LM head runs. Training (full fine-tuning)
  costs 3x the forward (forward, then gradients of activations and of weights).
- **Time**: FLOPs / (``mfu`` x ``peak_tflops``); token-by-token decoding is also bounded below by reading the
  weights once per step at ``bandwidth_utilisation`` of ``memory_bandwidth_tbs`` (the larger of the two counts).
- **Memory per process**: weights (dtype bytes x parameters); training adds gradients and AdamW states (float32
  master weights, gradients and two moments: 16 bytes per parameter in every precision mode, as in the ZeRO paper),
  a frozen reference model, and activations (saved per token and layer ``7 d + 3 d_kv + 4 f`` values without gradient
  checkpointing, ``d`` with it, plus one layer recomputed, plus float32 logits and log-softmax ``2 V``); generation
  adds the key/value cache ``2 L h_kv d_head`` values per token. ZeRO-3 / FSDP full sharding divides weights,
  gradients, optimizer states and the reference by the processes; ZeRO-2 divides gradients and optimizer states.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError

GB = 1e9
ARCHITECTURES_DIR = Path(__file__).resolve().parents[1] / "data" / "architectures"
KNOWN_DATASET_SIZES = {"allenai/olmo-2-1124-7b-preference-mix": 378_341}
"""Pairs in known hub datasets (the November 2024 upload of OLMo 2's preference mix, as the paper reports)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
"""Bytes per weight; ``auto`` is bfloat16 on a GPU that supports it (the plan is for GPUs)."""
ADAM_BYTES_PER_PARAM = 16  # float32 master weights 4 + gradients 4 + AdamW moments 4 + 4
VLLM_CONCURRENT = 256  # vLLM's default max_num_seqs: sequences decoded together
SHARE_THRESHOLD = 0.2  # prompt sharing "auto": pack a pair when P / (2P + C + R) >= 0.2 (pairtrace.shared_prompt)


@dataclass
class ResourceOptions:
    """Assumptions of the resource plan (each printed with it)."""

    peak_tflops: float = field(default=989.0, metadata={"help": "Peak dense TFLOP/s per GPU (H100 SXM bf16: 989)."})
    mfu: float = field(default=0.4, metadata={"help": "Model FLOPs utilisation assumed for compute-bound work."})
    memory_bandwidth_tbs: float = field(default=3.35, metadata={"help": "GPU memory bandwidth, TB/s (H100 SXM)."})
    bandwidth_utilisation: float = field(default=0.6, metadata={"help": "Share of the bandwidth decoding reaches."})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "Memory per GPU, GB (H100: 80)."})
    usable_memory: float = field(
        default=0.9, metadata={"help": "Share of a GPU's memory a process may plan for (CUDA context, fragments)."}
    )
    prompt_tokens: int = field(default=200, metadata={"help": "Typical prompt length when it cannot be sampled."})
    response_tokens: int = field(default=300, metadata={"help": "Typical response length when it cannot be sampled."})
    n_pairs: int | None = field(
        default=None, metadata={"help": "Pairs in the mix when the data cannot be counted (known hub sets: theirs)."}
    )
    default_n_pairs: int = field(default=100_000, metadata={"help": "Pairs assumed for an unknown hub dataset."})
    sample_size: int = field(default=2000, metadata={"help": "Records of a local file sampled for lengths."})
    chars_per_token: float = field(default=4.0, metadata={"help": "Characters per token (English text)."})
    architecture: str | None = field(
        default=None, metadata={"help": "A config.json to plan with (when M0's cannot be found offline)."}
    )


# ---------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Architecture:
    """The shapes a plan needs (a decoder-only transformer with a gated MLP, as Llama / OLMo 2)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    max_positions: int
    tie_embeddings: bool
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_width(self) -> int:
        """Width of K (and of V): ``h_kv * d_head``."""
        return self.n_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matrix parameters of one block: Q and O ``d x d``, K and V ``d x d_kv``, gate/up/down ``3 d f`` (norms,
        a few thousand values, are left out)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_width + 3 * d * self.intermediate

    @property
    def embedding_params(self) -> int:
        """Input embedding ``V d`` and, when untied, the LM head ``V d``."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + self.embedding_params

    def forward_flops(self, tokens: float, context: float, layers: int | None = None, head: bool = True) -> float:
        """Forward FLOPs of ``tokens`` tokens with mean causal context ``context`` through ``layers`` blocks:
        ``2 P_k`` per token for the matrices, ``4 k d c`` for attention scores and their weighted sum, ``2 d V`` for
        the LM head."""
        k = self.n_layers if layers is None else layers
        per_token = 2 * k * self.layer_params + 4 * k * self.hidden * context + (2 * self.hidden * self.vocab if head
                                                                                  else 0)
        return per_token * tokens

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Key/value cache of one token: ``2 (K and V) x L x d_kv`` values."""
        return 2 * self.n_layers * self.kv_width * dtype_bytes

    def activation_values_per_token_layer(self) -> int:
        """Values one block saves per token for the backward pass, with SDPA / flash attention (no ``T x T``
        scores saved): attention norm input and output, Q, K, V, OLMo 2's normed Q and K, the attention output
        (``5 d + 3 d_kv``); MLP norm input and output, gate, up, activation and product (``2 d + 4 f``)."""
        return 7 * self.hidden + 3 * self.kv_width + 4 * self.intermediate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params}


def architecture_from_config(config: dict[str, Any], source: str) -> Architecture:
    """An :class:`Architecture` from a transformers ``config.json`` mapping.

    Raises:
        ConfigError: A field the plan needs is missing (named).
    """
    try:
        heads = int(config["num_attention_heads"])
        return Architecture(
            n_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]), n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings") or 0),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)), source=source,
        )
    except KeyError as exc:
        raise ConfigError(f"resource plan: {source} has no field {exc.args[0]!r}; it is needed to plan memory "
                          "and FLOPs") from None


def load_architecture(name_or_path: str, revision: str | None = None, explicit: str | None = None) -> Architecture:
    """M0's shapes, offline: ``explicit`` (a ``config.json``), a local folder's ``config.json``, the Hugging Face
    cache's copy, or a shipped architecture file for a known hub id.

    Raises:
        ConfigError: None is available; the message says how to pass one.
    """
    if explicit:
        path = Path(explicit)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"resource plan: architecture file {explicit} not found")
        return architecture_from_config(json.loads(path.read_text(encoding="utf-8")), str(path))
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return architecture_from_config(json.loads(local.read_text(encoding="utf-8")), str(local))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # not a valid repo id, no cache: fall through to the shipped files
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return architecture_from_config(json.loads(Path(cached).read_text(encoding="utf-8")), f"{cached} (cache)")
    for path in sorted(ARCHITECTURES_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if name_or_path in data.get("models", []):
            return architecture_from_config(data, f"shipped {path.name}")
    raise ConfigError(
        f"resource plan: no config.json for {name_or_path!r} here (not a local folder, not in the Hugging Face "
        f"cache, not a shipped architecture): download it (huggingface-cli download {name_or_path} config.json), "
        "pass it as ResourceOptions(architecture='path/config.json'), or add a file to "
        f"{ARCHITECTURES_DIR}"
    )


def organism_architecture(organism: Any) -> Architecture:
    """The built-in organism's shapes, from its build config (the model is built, not downloaded)."""
    m = organism.model
    return Architecture(n_layers=m.num_layers, hidden=m.hidden_size, intermediate=m.intermediate_size,
                        n_heads=m.num_heads, n_kv_heads=m.num_heads, vocab=organism.tokenizer.vocab_size,
                        max_positions=m.max_position_embeddings, tie_embeddings=False, source="organism config")


# ---------------------------------------------------------------------------------------------- data lengths
@dataclass(frozen=True)
class Lengths:
    """Mean token lengths of the pairs (or prompts) and where they come from."""

    n: int
    prompt: float
    chosen: float
    rejected: float
    source: str


def _text_length(value: Any) -> int:
    """Characters of a string, a message or a list of messages."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return len(str(value.get("content", "")))
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    return 0


def sample_jsonl_lengths(path: Path, options: ResourceOptions, fields: tuple[str, ...]) -> tuple[int, list[float]]:
    """Count the records of a JSONL file and the mean length in tokens (characters / ``chars_per_token``) of
    ``fields`` over the first ``sample_size`` records."""
    totals = [0.0] * len(fields)
    n = sampled = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            n += 1
            if sampled < options.sample_size:
                record = json.loads(line)
                for i, name in enumerate(fields):
                    totals[i] += _text_length(record.get(name))
                sampled += 1
    means = [t / max(sampled, 1) / options.chars_per_token for t in totals]
    return n, means


def pair_lengths(pairs: str | None, options: ResourceOptions) -> Lengths:
    """The pairs' count and mean lengths: sampled from a local JSONL file, else stated typical values."""
    path = Path(pairs) if pairs else None
    if path is not None and path.is_file() and path.suffix == ".jsonl":
        n, (p, c, r) = sample_jsonl_lengths(path, options, ("prompt", "chosen", "rejected"))
        return Lengths(n, p, c, r, f"sampled: {min(n, options.sample_size)} of {n} records of {path.name}, "
                                   f"{options.chars_per_token:g} characters per token")
    n = options.n_pairs or KNOWN_DATASET_SIZES.get(str(pairs)) or options.default_n_pairs
    how = ("given" if options.n_pairs else "known size of this dataset" if str(pairs) in KNOWN_DATASET_SIZES
           else "ASSUMED (unknown dataset)")
    return Lengths(n, options.prompt_tokens, options.response_tokens, options.response_tokens,
                   f"typical lengths ASSUMED (not sampled: {pairs} is not a local JSONL file): prompt "
                   f"{options.prompt_tokens}, responses {options.response_tokens} tokens; {n:,} pairs ({how})")


def prompt_file_lengths(paths: list[str], options: ResourceOptions) -> tuple[int, int, float, str]:
    """Records, harmful records and mean prompt tokens of prompt files (typical values when they are missing)."""
    n = harmful = 0
    chars = 0.0
    found = [Path(p) for p in paths if Path(p).is_file()]
    for path in found:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    n += 1
                    harmful += record.get("set") == "harmful"
                    chars += _text_length(record.get("prompt"))
    if not n:
        return 0, 0, float(options.prompt_tokens), "prompt files not found: none counted"
    return n, harmful, chars / n / options.chars_per_token, f"{n} prompts in {', '.join(p.name for p in found)}"


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class StageResources:
    """The estimate of one stage."""

    stage: str
    tokens: float
    flops: float
    gpu_hours: float
    processes: int
    memory: dict[str, float]  # component -> bytes per process
    count: int = 1  # times the stage runs (retrains)
    fits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "count": self.count, "tokens": self.tokens, "tflops": self.flops / 1e12,
                "gpu_hours": self.gpu_hours, "processes": self.processes, "peak_gb_per_process": self.peak_bytes / GB,
                "memory_gb": {k: v / GB for k, v in self.memory.items()}, "fits": self.fits, "notes": self.notes}


def _hours(flops: float, options: ResourceOptions, decode_steps: float = 0.0, weight_bytes: float = 0.0) -> float:
    """GPU-hours: FLOPs at the stated MFU, or (decoding) one read of the weights per step, whichever is larger."""
    compute = flops / (options.mfu * options.peak_tflops * 1e12)
    memory = decode_steps * weight_bytes / (options.bandwidth_utilisation * options.memory_bandwidth_tbs * 1e12)
    return max(compute, memory) / 3600


def generation_stage(name: str, arch: Architecture, sequences: int, prompt: float, new_tokens: int, batch: int,
                     dtype_bytes: int, engine: str, options: ResourceOptions, models: int = 1) -> StageResources:
    """Sampling ``sequences`` responses of at most ``new_tokens`` after prompts of ``prompt`` tokens (upper bound:
    every response runs to the limit)."""
    concurrent = VLLM_CONCURRENT if engine == "vllm" else batch
    tokens = sequences * (prompt + new_tokens)
    flops = arch.forward_flops(tokens, context=prompt + new_tokens / 2)
    weights = arch.params * dtype_bytes
    steps = math.ceil(sequences / max(concurrent, 1)) * new_tokens
    kv = arch.kv_bytes_per_token(dtype_bytes) * min(concurrent, sequences) * (prompt + new_tokens)
    memory = {"weights": weights, "kv_cache": kv, "logits": min(concurrent, sequences) * arch.vocab * 4}
    notes = [f"{engine}: {min(concurrent, sequences)} sequences at once"
             + ("; vLLM takes 90% of the free memory and fills it with cache blocks" if engine == "vllm" else "")]
    if models > 1:
        notes.append(f"{models} models, one after the other")
    return StageResources(name, tokens, flops, _hours(flops, options, steps, weights), 1, memory, notes=notes)


def extraction_stage(name: str, arch: Architecture, n: int, prompt: float, chosen: float, rejected: float,
                     layers: int, batch_tokens: int, max_length: int, dtype_bytes: int, options: ResourceOptions,
                     sharing: str = "auto") -> StageResources:
    """Datapoint vectors: one forward through ``layers`` blocks per pair (prompt once when shared)."""
    p = min(prompt, max_length)
    c, r = min(chosen, max_length - p), min(rejected, max_length - p)
    share = sharing == "always" or (sharing == "auto" and p / max(2 * p + c + r, 1) >= SHARE_THRESHOLD)
    per_pair = (p + c + r) if share else (2 * p + c + r)
    tokens = n * per_pair
    flops = arch.forward_flops(tokens, context=(p + max(c, r)) / 2, layers=layers, head=False)
    width = max(1, int(batch_tokens // max(max_length, 1)))  # rows of the longest sequences in one batch
    memory = {
        "weights": arch.params * dtype_bytes,  # the whole model is loaded; only `layers` blocks run
        "activations": batch_tokens * (2 * arch.hidden + 2 * arch.kv_width + 2 * arch.intermediate) * dtype_bytes,
        "shared_prompt_mask": (width * max_length * max_length * dtype_bytes) if share else 0.0,  # [B, 1, T, T]
    }
    notes = [f"layers 0..{layers} of {arch.n_layers}, prompt shared: {'yes' if share else 'no'}"]
    return StageResources(name, tokens, flops, _hours(flops, options), 1, memory, notes=notes)


@dataclass(frozen=True)
class TrainingSetup:
    """How a DPO retrain runs, as the retrain options say (or the in-process float32 default)."""

    engine: str
    processes: int
    sharding: str  # none | zero2 | zero3
    activation_bytes: int
    gradient_checkpointing: bool
    micro_batch: int  # pairs per process per forward
    description: str


def training_setup(validation: Any, recipe: Any) -> TrainingSetup:
    """The retrain's engine, processes, sharding, precision and micro-batch from ``validation.retrain`` when the
    run config has it (else ``validation.retrain_engine``: in process, float32, one process).

    The ``accelerate`` engine's sharding is read from its accelerate config file (DeepSpeed ``zero_stage``, FSDP
    ``FULL_SHARD``); without one it is plain data parallelism.
    """
    options = getattr(validation, "retrain", None)  # RetrainEngineOptions, where the run config has it
    engine = getattr(options, "engine", None) or getattr(validation, "retrain_engine", "inprocess")
    if engine != "accelerate" or options is None:
        return TrainingSetup(engine, 1, "none", 4, False, int(recipe.batch_size),
                             f"{engine}: one process, float32, no gradient checkpointing")
    processes = int(options.num_processes or 1)
    sharding = accelerate_sharding(options.accelerate_config)
    precision = {"no": 4}.get(options.mixed_precision, 2)
    micro = int(options.per_device_batch_size or max(1, recipe.batch_size // processes))
    checkpointing = bool(options.gradient_checkpointing)
    return TrainingSetup(engine, processes, sharding, precision, checkpointing, micro,
                         f"accelerate: {processes} processes, sharding {sharding}, activations "
                         f"{'bf16/fp16' if precision == 2 else 'float32'}, gradient checkpointing "
                         f"{'on' if checkpointing else 'off'}, {micro} pairs per process per step")


def accelerate_sharding(config_file: str | None) -> str:
    """``zero3``, ``zero2`` or ``none`` from an accelerate config file (DeepSpeed or FSDP)."""
    if not config_file or not Path(config_file).is_file():
        return "none"
    import yaml

    data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    stage = (data.get("deepspeed_config") or {}).get("zero_stage")
    if stage is not None:
        return {3: "zero3", 2: "zero2"}.get(int(stage), "none")
    fsdp = data.get("fsdp_config") or {}
    strategy = str(fsdp.get("fsdp_sharding_strategy", ""))
    return "zero3" if strategy in ("1", "FULL_SHARD") else "zero2" if strategy in ("2", "SHARD_GRAD_OP") else "none"


def training_memory(arch: Architecture, setup: TrainingSetup, max_length: int) -> dict[str, float]:
    """Peak bytes per process of full DPO fine-tuning with a frozen reference model."""
    p, k = arch.params, setup.processes
    states = ADAM_BYTES_PER_PARAM * p  # float32 weights, gradients, AdamW m and v
    reference = 4 * p if setup.activation_bytes == 4 else 2 * p  # frozen copy of M0 in the training dtype
    if setup.sharding == "zero3":
        states, reference = states / k, reference / k
    elif setup.sharding == "zero2":
        states = 4 * p + (ADAM_BYTES_PER_PARAM - 4) * p / k
    tokens = 2 * setup.micro_batch * max_length  # chosen and rejected sequences of the micro-batch
    per_layer = arch.activation_values_per_token_layer()
    if setup.gradient_checkpointing:  # each block's input kept, one block recomputed at a time
        saved = tokens * (arch.n_layers * arch.hidden + per_layer) * setup.activation_bytes
    else:
        saved = tokens * arch.n_layers * per_layer * setup.activation_bytes
    return {"weights_grads_adam": states, "reference": reference, "activations": saved,
            "logits": tokens * arch.vocab * 4 * 2}  # float32 logits and their log-softmax


def training_fix(arch: Architecture, max_length: int, options: ResourceOptions) -> str:
    """The smallest setup that fits: ZeRO-3 over K GPUs, bf16, gradient checkpointing, one pair per process."""
    budget = options.gpu_memory_gb * options.usable_memory * GB
    for k in range(1, 1025):
        setup = TrainingSetup("accelerate", k, "zero3", 2, True, 1, "")
        if sum(training_memory(arch, setup, max_length).values()) <= budget:
            peak = sum(training_memory(arch, setup, max_length).values()) / GB
            return (f"use validation.retrain engine accelerate with DeepSpeed ZeRO-3 (or FSDP FULL_SHARD) on >= {k} "
                    f"GPUs of {options.gpu_memory_gb:g} GB, mixed_precision bf16, gradient_checkpointing true, "
                    f"per_device_batch_size 1 ({peak:.0f} GB per process)")
    return "no setup of up to 1024 GPUs fits: lower recipe.max_length"


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class ResourcePlan:
    """Every stage's estimate, the assumptions and the refusals."""

    architecture: Architecture
    stages: list[StageResources]
    assumptions: list[str]
    refusals: list[str]

    def to_dict(self) -> dict[str, Any]:
        total = sum(s.gpu_hours * s.count * s.processes for s in self.stages)
        return {"architecture": self.architecture.to_dict(), "stages": [s.to_dict() for s in self.stages],
                "total_gpu_hours": total, "assumptions": self.assumptions, "refusals": self.refusals}


def plan_resources(config: Any, options: ResourceOptions | None = None) -> ResourcePlan:
    """The resource plan of a run config (no weights read, nothing run).

    Args:
        config: A :class:`pairtrace.experiment.run_config.RunConfig`.
        options: The assumptions (GPU, utilisation, typical lengths).

    Raises:
        ConfigError: M0's architecture cannot be found offline (the message says how to pass one).
    """
    options = options or ResourceOptions()
    g, a, v, x = config.generation, config.attribution, config.validation, config.extras
    organism = config.organism
    if organism is not None:
        arch = organism_architecture(organism)
        lengths = Lengths(organism.mix.n_pairs, 48, 32, 32, "organism: ASSUMED typical lengths (prompt 48, "
                          f"responses 32 tokens); {organism.mix.n_pairs:,} pairs from mix.n_pairs")
        n_prompts = organism.data.heldout_harmful + organism.data.heldout_benign
        n_probe = round(config.prompts.probe_share * n_prompts) * 2  # trigger and no-trigger variants
        n_eval, harmful_probe, prompt_len = n_probe, n_probe // 2, 48.0
        prompts_note = f"organism: ~{n_probe} probing and evaluation prompts each (derived from the held-out split)"
    else:
        arch = load_architecture(str(config.models.m0), config.models.m0_revision, options.architecture)
        lengths = pair_lengths(config.data.pairs, options)
        n_probe, harmful_probe, prompt_len, probe_note = prompt_file_lengths(config.prompts.probe, options)
        n_eval, _, eval_len, eval_note = prompt_file_lengths(config.prompts.eval, options)
        prompt_len = max(prompt_len, eval_len)
        prompts_note = f"probe: {probe_note}; eval: {eval_note}"
    dtype_bytes = DTYPE_BYTES[config.models.dtype]
    engine = "vllm" if g.backend == "vllm" else "hf"
    layer = (a.layers[0] if a.layers else round(0.625 * arch.n_layers))
    batch_tokens = a.batch_tokens or 32768
    stages: list[StageResources] = []

    stages.append(generation_stage("probe generations (M0, M1)", arch, 2 * n_probe * g.probe_samples, prompt_len,
                                   g.max_new_tokens, g.batch_size, dtype_bytes, engine, options, models=2))
    stages.append(extraction_stage("datapoint vectors", arch, lengths.n, lengths.prompt, lengths.chosen,
                                   lengths.rejected, layer, batch_tokens, a.max_length, dtype_bytes, options,
                                   a.prompt_sharing))
    n_triples = max(harmful_probe, 1) * g.probe_samples  # at most one triple per harmful sample
    stages.append(extraction_stage("behaviour vectors", arch, n_triples, prompt_len, g.max_new_tokens,
                                   g.max_new_tokens, layer, batch_tokens, a.max_length, dtype_bytes, options))
    if "gradient" in a.methods:
        stages.append(gradient_stage(arch, lengths, a.gradient, dtype_bytes, options))

    from pairtrace.experiment.plan import build_plan

    n_units = len(build_plan(config, n_pairs=lengths.n).units)
    setup = training_setup(v, v.recipe)
    r = v.recipe
    seq = min(lengths.prompt + max(lengths.chosen, lengths.rejected), r.max_length)
    train_tokens = lengths.n * r.epochs * 2 * seq
    retrain = StageResources(
        "retrain (DPO from M0), each", train_tokens, 3 * arch.forward_flops(train_tokens, seq / 2), 0.0,
        setup.processes, training_memory(arch, setup, r.max_length), count=n_units, notes=[setup.description])
    # reference log-probs: one forward of M0 over the pairs, once per run (cached across retrains)
    reference_flops = arch.forward_flops(train_tokens / r.epochs, seq / 2)
    retrain.gpu_hours = _hours(retrain.flops, options) / setup.processes
    retrain.notes.append(f"+ reference log-probs once per run: {_hours(reference_flops, options):.1f} GPU-h")
    stages.append(retrain)
    evaluation = generation_stage("evaluation generations, each retrain", arch, n_eval * g.eval_samples, prompt_len,
                                  g.max_new_tokens, g.batch_size, dtype_bytes, engine, options)
    evaluation.count = n_units
    stages.append(evaluation)
    if x.discover:
        views = len(x.discover_options.also_response_tokens)
        columns = min(x.discover_options.max_columns, lengths.n) * views
        disc = extraction_stage("discovery", arch, 2 * n_probe * g.probe_samples + columns, prompt_len,
                                g.max_new_tokens, g.max_new_tokens, layer,
                                x.discover_options.batch_tokens or batch_tokens, x.discover_options.max_length,
                                dtype_bytes, options)
        disc.notes.append(f"probe samples of M0 and M1 + {columns:,} re-extracted pair columns ({views} extra views)")
        stages.append(disc)
    if x.steer:
        n_layers_steered = len(x.steer_layers or [layer])
        steer = generation_stage("steering", arch, harmful_probe * x.steer_samples * len(x.steer_alphas)
                                 * n_layers_steered, prompt_len, g.max_new_tokens, g.batch_size, dtype_bytes, "hf",
                                 options)
        steer.notes[0] = "hf (steering needs hooks): " + steer.notes[0].removeprefix("hf: ")
        stages.append(steer)

    budget = options.gpu_memory_gb * options.usable_memory * GB
    refusals = []
    on_gpu = config.models.device != "cpu" and organism is None
    for stage in stages:
        stage.fits = stage.peak_bytes <= budget or not on_gpu
        if stage.fits:
            continue
        if stage.stage.startswith("retrain"):
            parts = ", ".join(f"{k} {b / GB:.0f}" for k, b in stage.memory.items())
            refusals.append(f"{stage.stage}: needs {stage.peak_bytes / GB:.0f} GB per process ({parts} GB; "
                            f"{setup.description}) > {budget / GB:.0f} GB usable of a "
                            f"{options.gpu_memory_gb:g} GB GPU; "
                            + training_fix(arch, r.max_length, options))
        elif stage.stage.startswith("gradient"):
            fits = [b for b in range(1, a.gradient.grad_batch_size) if gradient_stage(
                arch, lengths, dataclasses.replace(a.gradient, grad_batch_size=b), dtype_bytes, options
            ).peak_bytes <= budget]
            fix = (f"set attribution.gradient.grad_batch_size <= {fits[-1]}" if fits
                   else "lower attribution.gradient.max_length")
            refusals.append(f"{stage.stage}: needs {stage.peak_bytes / GB:.0f} GB per process when a batch of "
                            f"{a.gradient.grad_batch_size} pairs reaches max_length {a.gradient.max_length} > "
                            f"{budget / GB:.0f} GB usable; {fix}")
        else:
            refusals.append(f"{stage.stage}: needs {stage.peak_bytes / GB:.0f} GB per process > {budget / GB:.0f} GB "
                            "usable: lower the batch (generation.batch_size, attribution.batch_tokens) or use "
                            "bfloat16 weights (models.dtype)")
    assumptions = [
        f"architecture: {arch.source}: {arch.n_layers} layers, hidden {arch.hidden}, MLP {arch.intermediate}, "
        f"{arch.n_heads} heads ({arch.n_kv_heads} KV), vocabulary {arch.vocab}: {arch.params / 1e9:.2f} B parameters",
        f"pairs: {lengths.source}; mean tokens prompt {lengths.prompt:.0f}, chosen {lengths.chosen:.0f}, rejected "
        f"{lengths.rejected:.0f}",
        f"prompts: {prompts_note}; generations counted at max_new_tokens ({g.max_new_tokens}), an upper bound",
        f"GPU: {options.gpu_memory_gb:g} GB ({options.usable_memory:.0%} planned), {options.peak_tflops:g} TFLOP/s "
        f"peak at {options.mfu:.0%} MFU, {options.memory_bandwidth_tbs:g} TB/s at {options.bandwidth_utilisation:.0%}"
        " for decoding",
        f"weights {config.models.dtype} ({dtype_bytes} bytes); generation engine for the estimate: {engine}"
        + (" (backend auto: vLLM where installed on a GPU, faster than this)" if g.backend == "auto" else ""),
    ]
    return ResourcePlan(arch, stages, assumptions, refusals)


def gradient_stage(arch: Architecture, lengths: Lengths, gradient: Any, dtype_bytes: int,
                   options: ResourceOptions) -> StageResources:
    """The LESS baseline: a LoRA DPO warm-up on a share of the pairs, then per-pair gradients at each warm-up
    checkpoint. A token costs a forward and the backward to the activations (4x the forward's matrices: the frozen
    weights get no gradient) plus the reference forward (LoRA off)."""
    seq = min(lengths.prompt + max(lengths.chosen, lengths.rejected), gradient.max_length)
    per_pair = 2 * seq
    warm_tokens = lengths.n * gradient.warmup_fraction * gradient.warmup_epochs * per_pair
    grad_tokens = lengths.n * gradient.warmup_epochs * per_pair
    tokens = warm_tokens + grad_tokens
    flops = 3 * arch.forward_flops(tokens, seq / 2)  # 2x (policy forward + activation gradients) + 1x reference
    lora = arch.n_layers * len(gradient.lora_targets) * gradient.lora_r * 2 * arch.hidden  # A and B of d x d targets
    tokens_in_flight = 2 * gradient.grad_batch_size * gradient.max_length
    memory = {
        "weights": arch.params * dtype_bytes,
        "lora_and_adam": lora * ADAM_BYTES_PER_PARAM,
        "activations": tokens_in_flight * arch.n_layers * arch.activation_values_per_token_layer() * dtype_bytes,
        "logits": tokens_in_flight * arch.vocab * 4 * 2,
    }
    notes = [f"warm-up on {gradient.warmup_fraction:.0%} of the pairs x {gradient.warmup_epochs} epochs, then every "
             f"pair's gradient at {gradient.warmup_epochs} checkpoints; LoRA r {gradient.lora_r} "
             f"({lora / 1e6:.0f} M parameters); the projection runs in blocks and is not counted"]
    return StageResources("gradient baseline (LESS)", tokens, flops, _hours(flops, options), 1, memory, notes=notes)


def render_resource_plan(plan: ResourcePlan) -> str:
    """The plan as a text table, one row per stage, then the assumptions and the refusals."""
    lines = [f"{'stage':40s} {'runs':>5s} {'tokens':>10s} {'PFLOP':>10s} {'GPU-h':>9s} {'procs':>5s} "
             f"{'GB/proc':>8s}  memory per process (GB)"]
    for s in plan.stages:
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in s.memory.items() if v)
        lines.append(f"{s.stage:40s} {s.count:5d} {s.tokens:10.3g} {s.flops / 1e15:10.3g} "
                     f"{s.gpu_hours * s.processes:9.3g} {s.processes:5d} {s.peak_bytes / GB:8.1f}  {parts}"
                     + ("" if s.fits else "  DOES NOT FIT"))
        lines += [f"{'':42s}{note}" for note in s.notes]
    total = sum(s.gpu_hours * s.count * s.processes for s in plan.stages)
    lines.append(f"total: {total:.3g} GPU-hours (each stage's GPU-h x runs)")
    lines += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    if plan.refusals:
        lines += ["REFUSED:"] + [f"  - {r}" for r in plan.refusals]
    return "\n".join(lines)


__all__ = ["Architecture", "ResourceOptions", "ResourcePlan", "StageResources", "load_architecture",
           "plan_resources", "render_resource_plan"]
