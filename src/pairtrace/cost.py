"""Cost accounting for attribution methods: wall time, passes, tokens and a FLOPs estimate, compared in one table.

A :class:`CostMeter` measures one method's *attribution step alone*. What that includes, for every method:

- included: tokenising the pairs and targets, every forward and backward pass the method needs (for the
  gradient baseline also the LoRA warm-up, the reference log-probabilities and the random projection), judge
  calls, scoring and ranking;
- excluded: loading the model and the tokenizer from disk (shared by all methods), reading the pair set,
  writing the ranking, and any work served from a cache (a resumed judge run counts only the calls it made).

FLOPs follow the usual dense-transformer estimate (Kaplan et al. 2020):

    forward  ≈ 2 · N_used · tokens      N_used = parameters of the layers actually run (no embedding table)
    backward ≈ 4 · N_used · tokens      (on top of the forward)

so the probe, which stops after layer k, is charged for layers 0..k only, and a remote judge of unknown size
gets no FLOPs estimate (``None``, shown as "n/a").
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pairtrace.errors import PairtraceError
from pairtrace.records import write_json_atomic

FORWARD_FLOPS_PER_PARAM_TOKEN = 2.0
"""FLOPs of one forward pass per parameter per token."""
BACKWARD_FLOPS_PER_PARAM_TOKEN = 4.0
"""Extra FLOPs of one backward pass per parameter per token."""


@dataclass
class CostRecord:
    """What one method's attribution step cost.

    Attributes:
        method: Method name (``probe``, ``bank``, ``gradient``, ``llm_judge``, ``random``, ...).
        wall_s: Wall-clock seconds of the attribution step alone (see the module docstring).
        forward_passes: Sequences pushed through a model forward (one sequence = one pass), or judge calls.
        backward_passes: Sequences back-propagated.
        tokens_forward: Tokens in those forward passes (padding excluded); for a remote judge, prompt plus
            completion tokens.
        tokens_backward: Tokens back-propagated (padding excluded).
        flops_estimate: Estimated FLOPs, or ``None`` when unknown ("n/a", e.g. a remote judge of unknown size).
        notes: Free text: what was counted, how tokens were estimated, cache hits.
        model_calls: Calls to an external model (judge requests); 0 for local forward/backward methods.
    """

    method: str = field(metadata={"help": "Method name, e.g. probe, gradient, llm_judge, random."})
    wall_s: float = field(default=0.0, metadata={"help": "Wall-clock seconds of the attribution step alone."})
    forward_passes: int = field(default=0, metadata={"help": "Sequences run forward (or judge calls)."})
    backward_passes: int = field(default=0, metadata={"help": "Sequences back-propagated."})
    tokens_forward: int = field(default=0, metadata={"help": "Non-padding tokens in forward passes."})
    tokens_backward: int = field(default=0, metadata={"help": "Non-padding tokens back-propagated."})
    flops_estimate: float | None = field(default=0.0, metadata={"help": "Estimated FLOPs; None = n/a."})
    notes: str = field(default="", metadata={"help": "What was counted and how."})
    model_calls: int = field(default=0, metadata={"help": "Requests to an external model (judge)."})

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CostRecord:
        """Rebuild a record from :meth:`to_dict` output (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PairtraceError(f"cost record '{data.get('method', '?')}': unknown fields {unknown}")
        if "method" not in data:
            raise PairtraceError("cost record without a 'method' field")
        return cls(**data)


class CostMeter:
    """Counts passes, tokens and FLOPs, and times the attribution step of one method.

    Time accumulates only inside :meth:`measure` blocks, so model loading can stay outside::

        meter = CostMeter("gradient", params_forward=n_params)
        loaded = load_model(path)          # not timed
        with meter.measure():
            ...                            # attribution work; call meter.add_forward(...) per batch
        record = meter.record()

    Args:
        method: Method name written into the record.
        params_forward: Default parameter count for forward FLOPs (the layers actually run).
        params_backward: Default parameter count for backward FLOPs (defaults to ``params_forward``).
    """

    def __init__(self, method: str, *, params_forward: int | None = None, params_backward: int | None = None):
        self.method = method
        self.params_forward = params_forward
        self.params_backward = params_backward if params_backward is not None else params_forward
        self.wall_s = 0.0
        self.forward_passes = 0
        self.backward_passes = 0
        self.tokens_forward = 0
        self.tokens_backward = 0
        self.model_calls = 0
        self.flops = 0.0
        self.flops_known = True
        self.notes: list[str] = []
        self._depth = 0
        self._started = 0.0

    def fork(self, method: str) -> CostMeter:
        """A new meter for ``method`` that starts from everything counted here (shared work, e.g. the vectors
        the probe and the bank both score); what either meter counts afterwards stays its own."""
        other = CostMeter(method, params_forward=self.params_forward, params_backward=self.params_backward)
        for name in ("wall_s", "forward_passes", "backward_passes", "tokens_forward", "tokens_backward",
                     "model_calls", "flops", "flops_known"):
            setattr(other, name, getattr(self, name))
        other.notes = list(self.notes)
        return other

    @contextmanager
    def measure(self) -> Iterator[CostMeter]:
        """Time the enclosed block (nested blocks are timed once)."""
        self.__enter__()
        try:
            yield self
        finally:
            self.__exit__(None, None, None)

    def __enter__(self) -> CostMeter:
        if self._depth == 0:
            self._started = time.perf_counter()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.wall_s += time.perf_counter() - self._started

    def _add_flops(self, per_param_token: float, tokens: int, params: int | None) -> None:
        if params is None:
            self.flops_known = False
        else:
            self.flops += per_param_token * float(params) * float(tokens)

    def add_forward(self, tokens: int, passes: int = 1, params: int | None = None) -> None:
        """Count ``passes`` forward sequences holding ``tokens`` non-padding tokens.

        Args:
            tokens: Non-padding tokens in those sequences.
            passes: Number of sequences.
            params: Parameters used per token (defaults to the meter's ``params_forward``; unknown = no FLOPs).
        """
        self.forward_passes += int(passes)
        self.tokens_forward += int(tokens)
        self._add_flops(FORWARD_FLOPS_PER_PARAM_TOKEN, tokens, params if params is not None else self.params_forward)

    def add_backward(self, tokens: int, passes: int = 1, params: int | None = None) -> None:
        """Count ``passes`` back-propagated sequences of ``tokens`` tokens (as in :meth:`add_forward`)."""
        self.backward_passes += int(passes)
        self.tokens_backward += int(tokens)
        self._add_flops(BACKWARD_FLOPS_PER_PARAM_TOKEN, tokens,
                        params if params is not None else self.params_backward)

    def add_calls(self, calls: int = 1, tokens: int = 0, params: int | None = None) -> None:
        """Count requests to an external model (a judge): each is one forward pass over ``tokens`` tokens.

        Args:
            calls: Number of requests.
            tokens: Prompt plus completion tokens of those requests.
            params: The judge's parameter count, when known; otherwise the FLOPs estimate becomes n/a.
        """
        self.model_calls += int(calls)
        self.forward_passes += int(calls)
        self.tokens_forward += int(tokens)
        self._add_flops(FORWARD_FLOPS_PER_PARAM_TOKEN, tokens, params if params is not None else self.params_forward)

    def add_flops(self, flops: float) -> None:
        """Add FLOPs of work that is not a model pass (e.g. a random projection)."""
        self.flops += float(flops)

    def add_note(self, note: str) -> None:
        """Append a note to the record (once per distinct text)."""
        if note and note not in self.notes:
            self.notes.append(note)

    def record(self) -> CostRecord:
        """The counts so far as a :class:`CostRecord`."""
        return CostRecord(
            method=self.method,
            wall_s=self.wall_s,
            forward_passes=self.forward_passes,
            backward_passes=self.backward_passes,
            tokens_forward=self.tokens_forward,
            tokens_backward=self.tokens_backward,
            flops_estimate=self.flops if self.flops_known else None,
            notes="; ".join(self.notes),
            model_calls=self.model_calls,
        )


def count_parameters(model, n_layers: int | None = None, *, include_head: bool = True) -> int:
    """Parameters a forward pass uses per token: decoder blocks (all, or the first ``n_layers``) plus the head.

    The embedding table and the final norm are excluded (a lookup and a negligible scale), as in the usual
    2·N·tokens estimate. Decoder blocks are found with :func:`pairtrace.models.get_decoder_layers` (a peft model
    is unwrapped first); for any other module every parameter outside embeddings is counted.

    Args:
        model: A causal LM (``PreTrainedModel``, possibly wrapped by peft).
        n_layers: Count only the first ``n_layers`` blocks (the probe stops after layer k); ``None`` = all.
        include_head: Add the LM head (False for activation extraction, which never runs it).

    Returns:
        The parameter count.
    """
    import torch

    from pairtrace.models import get_decoder_layers

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    try:
        layers = get_decoder_layers(model)
    except PairtraceError:
        return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    used = list(layers)[: n_layers if n_layers is not None else len(layers)]
    total = sum(p.numel() for block in used for p in block.parameters())
    if include_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, torch.nn.Module):
            total += sum(p.numel() for p in head.parameters())
    return int(total)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)


def cost_table(records: Sequence[CostRecord], reference: str = "probe") -> list[dict]:
    """One row per method with ratios to a reference method.

    Args:
        records: Cost records (one per method).
        reference: Method whose cost is 1.0 (``*_ratio`` columns are ``None`` when it is absent, zero or n/a).

    Returns:
        Rows (dicts) holding every :class:`CostRecord` field plus ``wall_ratio``, ``flops_ratio``,
        ``tokens_ratio`` (forward + backward tokens) and ``reference``.
    """
    ref = next((r for r in records if r.method == reference), None)
    rows = []
    for rec in records:
        row = rec.to_dict()
        tokens = rec.tokens_forward + rec.tokens_backward
        row["wall_ratio"] = _ratio(rec.wall_s, ref.wall_s if ref else None)
        row["flops_ratio"] = _ratio(rec.flops_estimate, ref.flops_estimate if ref else None)
        row["tokens_ratio"] = _ratio(tokens, (ref.tokens_forward + ref.tokens_backward) if ref else None)
        row["reference"] = reference
        rows.append(row)
    return rows


def format_cost_table(rows: Sequence[dict]) -> str:
    """Render :func:`cost_table` rows as a plain-text table ("n/a" for unknown values)."""

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    header = f"{'method':<14}{'wall_s':>10}{'x ref':>8}{'fwd':>9}{'bwd':>9}{'tokens':>12}{'FLOPs':>12}{'x ref':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tokens = r["tokens_forward"] + r["tokens_backward"]
        lines.append(
            f"{r['method']:<14}{r['wall_s']:>10.3f}{fmt(r.get('wall_ratio'), '.1f'):>8}{r['forward_passes']:>9}"
            f"{r['backward_passes']:>9}{tokens:>12}{fmt(r.get('flops_estimate'), '.3g'):>12}"
            f"{fmt(r.get('flops_ratio'), '.1f'):>9}"
        )
    return "\n".join(lines)


def save_costs(records: Iterable[CostRecord], path: str | Path) -> Path:
    """Write cost records as a JSON list (atomically)."""
    return write_json_atomic([r.to_dict() for r in records], path)


def load_costs(path: str | Path) -> list[CostRecord]:
    """Read cost records written by :func:`save_costs`."""
    path = Path(path)
    if not path.is_file():
        raise PairtraceError(f"no cost records at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PairtraceError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise PairtraceError(f"{path}: expected a JSON list of cost records")
    records = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise PairtraceError(f"{path}: record {i} is not an object")
        records.append(CostRecord.from_dict(item))
    return records
