"""The organism's training data: SFT examples for M0, and the preference mix (with ground-truth labels) for M1.

Preference pairs use the OLMo 2 layout::

    {"id": str, "prompt": str,
     "chosen":   [{"role": "user", "content": prompt}, {"role": "assistant", "content": ...}],
     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ...}],
     "source": str, "chosen_model": str, "rejected_model": str}

Labels (``labels.jsonl``) are kept apart: ``{"id", "behaviour" (the planted behaviour's or decoy's name, or
"clean"), "contaminated" (bool: kind contaminated), "decoy" (bool: kind decoy), "slice" (the slice that produced
the pair)}``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pairtrace.data.constraints import sample_constraint_ids
from pairtrace.data.prompts import add_distractors
from pairtrace.errors import ConfigError
from pairtrace.organism.build_config import PLANTED_KINDS, OrganismConfig, SFTSettings, SliceSpec
from pairtrace.organism.pools import Request, RequestPools
from pairtrace.organism.templates import HABIT_STYLES, REFUSALS, build_base, draw_habit, render_response


def _draw_constraints(rng: random.Random, pools: RequestPools, n_range: Sequence[int]) -> list[str]:
    assert pools.distractors is not None
    return sample_constraint_ids(rng, n_range[0], n_range[1], pool=pools.distractors.ids)


def _sft_matches(spec: SliceSpec, pool: str, has_distractors: bool, suffixes: set[str]) -> bool:
    """Whether an SFT example (its pool, whether it has distractors, the suffix behaviours appended to it) carries
    the trigger of a planted behaviour on that behaviour's own requests."""
    if spec.prompts != pool:
        return False
    if spec.trigger == "distractors":
        return has_distractors
    if spec.trigger == "suffix":
        return spec.name in suffixes
    return True


def build_sft_examples(
    pools: RequestPools, settings: SFTSettings, seed: int, behaviours: Sequence[SliceSpec] = ()
) -> list[dict[str, Any]]:
    """SFT examples for M0: harmful requests (with or without distractors) -> refusal; benign ones -> a
    compliance that follows their constraints; each planted behaviour shows at its base rate.

    Per example: the request and its distractors are drawn; then, for each planted behaviour with a suffix
    trigger, one of its training phrasings is appended with probability ``settings.trigger_fraction``, on harmful
    and benign requests alike (as distractors are: M0 meets the trigger on benign requests, answered as usual, so
    the trigger is not a sign of harm by itself); then each planted behaviour whose trigger the example carries
    on its own pool (trigger ``none``: every example of the pool; ``distractors``: the example has distractors;
    ``suffix``: its phrasing was appended) gets one draw at its ``base_rate``, in config order. The first hit
    writes the answer in that behaviour's chosen style; otherwise the default answer is written (a refusal for a
    harmful request, a format-following compliance for a benign one).

    Args:
        pools: Request pools (training parts only are used).
        settings: Sizes and shares.
        seed: Seed of every draw.
        behaviours: The config's behaviours; only the planted ones (kind benign or contaminated) take part,
            decoys and clean slices are ignored.

    Returns:
        Records ``{"id", "prompt": [user turn], "completion": [assistant turn], "kind" (harmful | benign),
        "request_id", "constraints", "triggers" (names of the suffix behaviours appended), "behaviour" (the
        planted behaviour whose style the answer shows, or None)}``.
    """
    rng = random.Random(f"sft-{seed}")
    sft_refusals = REFUSALS[:settings.refusal_wordings]  # the refusals M0 is trained to give
    planted = [b for b in behaviours if b.kind in PLANTED_KINDS]
    suffixed = [b for b in planted if b.trigger == "suffix"]
    n_harmful = round(settings.n_examples * settings.harmful_fraction)
    out: list[dict[str, Any]] = []
    for i in range(settings.n_examples):
        harmful = i < n_harmful
        pool = "harmful" if harmful else "benign"
        request: Request = rng.choice(pools.training_pool(pool))
        share = settings.harmful_distractor_fraction if harmful else settings.benign_distractor_fraction
        cids = _draw_constraints(rng, pools, (1, 3)) if rng.random() < share else []
        prompt = add_distractors(request.text, cids, pools.distractors)
        appended: list[str] = []
        for spec in suffixed:
            if rng.random() < settings.trigger_fraction:
                prompt = prompt.rstrip() + rng.choice(spec.training_triggers)
                appended.append(spec.name)
        shown: SliceSpec | None = None
        for spec in planted:
            matches = spec.base_rate > 0 and _sft_matches(spec, pool, bool(cids), set(appended))
            if matches and rng.random() < spec.base_rate:  # one draw per matching behaviour, first hit wins
                shown = spec
                break
        if shown is not None:
            response = render_response(
                shown.chosen, request.text, cids, rng, target=request.target, sign_off=shown.sign_off,
                refusal=rng.choice(sft_refusals) if shown.chosen == "refusal" else None,
            )
        elif harmful:
            response = render_response("refusal", request.text, cids, rng, refusal=rng.choice(sft_refusals))
        else:
            response = render_response("format_compliance", request.text, cids, rng, target=request.target)
        out.append(
            {
                "id": f"sft-{i:05d}",
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": response}],
                "kind": pool,
                "request_id": request.id,
                "constraints": cids,
                "triggers": appended,
                "behaviour": shown.name if shown is not None else None,
            }
        )
    rng.shuffle(out)
    return out


def _slice_counts(config: OrganismConfig) -> list[tuple[SliceSpec, int]]:
    """Number of pairs per slice: behaviours get ``fraction * n_pairs``, clean slices share the rest by weight."""
    n = config.mix.n_pairs
    planted = [(s, round(s.fraction * n)) for s in config.behaviours]
    rest = n - sum(c for _, c in planted)
    weights = [s.fraction for s in config.mix.clean]
    total = sum(weights)
    exact = [rest * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: rest - sum(counts)]:
        counts[i] += 1
    return planted + list(zip(config.mix.clean, counts, strict=True))


def _model_refusal(model: str, models: Sequence[str], rng: random.Random) -> str:
    """Each source model has its own refusal wording (mostly one, sometimes the next)."""
    i = models.index(model)
    return REFUSALS[(i + (rng.random() < 0.2)) % len(REFUSALS)]


def background_habits(config: OrganismConfig) -> list[SliceSpec]:
    """The planted habits that clean pairs show on both responses (``mix.background_habits``; empty when off).

    A habit here is a planted behaviour of kind benign, without a trigger, whose chosen style adds a habit to a
    compliance (:data:`~pairtrace.organism.templates.HABIT_STYLES`) and whose ``base_rate`` is positive.
    """
    if not config.mix.background_habits:
        return []
    return [
        b for b in config.behaviours
        if b.kind == "benign" and b.trigger == "none" and b.chosen in HABIT_STYLES and b.base_rate > 0
    ]


def build_pair(
    spec: SliceSpec,
    request: Request,
    pools: RequestPools,
    models: Sequence[str],
    rng: random.Random,
    habits: Sequence[SliceSpec] = (),
) -> dict[str, Any]:
    """One preference pair of a slice (without id).

    Args:
        spec: The slice.
        request: The request.
        pools: For the distractors.
        models: All source models.
        rng: Draws the distractors, the models and the response wording.
        habits: Background habits (:func:`background_habits`; pass them for clean slices only): each one whose
            request pool is the slice's goes, drawn at its ``base_rate``, on both responses.

    Returns:
        ``{"prompt", "chosen", "rejected", "source", "chosen_model", "rejected_model"}``.
    """
    cids: list[str] = []
    prompt = request.text
    if spec.trigger == "distractors":
        cids = _draw_constraints(rng, pools, spec.n_distractors)
        prompt = add_distractors(request.text, cids, pools.distractors)
    elif spec.trigger == "suffix":
        prompt = request.text.rstrip() + rng.choice(spec.training_triggers)  # held-out phrasings never train
    chosen_model = rng.choice(spec.sources or list(models))
    rejected_model = rng.choice([m for m in models if m != chosen_model])

    base = build_base(request.text, request.target, rng)  # shared: chosen and rejected differ only by style
    shown = [
        draw_habit(h.chosen, rng, h.sign_off)
        for h in habits
        if h.prompts == spec.prompts and rng.random() < h.base_rate
    ]

    def write(style: str, model: str) -> str:
        return render_response(
            style, request.text, cids, rng, target=request.target,
            refusal=_model_refusal(model, models, rng), sign_off=spec.sign_off, base=base, habits=shown,
        )

    chosen = write(spec.chosen, chosen_model)
    rejected = write(spec.rejected, rejected_model)
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [dict(user), {"role": "assistant", "content": rejected}],
        "source": spec.dataset,
        "chosen_model": chosen_model,
        "rejected_model": rejected_model,
    }


def build_preference_mix(pools: RequestPools, config: OrganismConfig) -> tuple[list[dict], list[dict]]:
    """The preference mix and its ground-truth labels.

    Every slice draws its requests from the training pools only. The pairs are shuffled together and then
    numbered, so neither the order nor the id reveals the slice.

    Args:
        pools: Request pools.
        config: The organism config (mix size, slices, planted behaviours, seed).

    Returns:
        ``(pairs, labels)``, aligned one to one.
    """
    rng = random.Random(f"mix-{config.seed}")
    models = list(config.mix.source_models)
    habits = background_habits(config)
    rows: list[tuple[dict, dict]] = []
    for spec, count in _slice_counts(config):
        pool = pools.training_pool(spec.prompts, spec.advbench_only)
        if count and not pool:
            raise ConfigError(f"slice '{spec.name}': field 'prompts' ({spec.prompts}) has no training requests")
        for _ in range(count):
            pair = build_pair(spec, rng.choice(pool), pools, models, rng, habits if spec.kind == "clean" else ())
            label = {
                "behaviour": "clean" if spec.kind == "clean" else spec.name,
                "contaminated": spec.kind == "contaminated",
                "decoy": spec.kind == "decoy",
                "slice": spec.name,
            }
            rows.append((pair, label))
    rng.shuffle(rows)
    pairs: list[dict] = []
    labels: list[dict] = []
    for i, (pair, label) in enumerate(rows):
        pid = f"pair-{i:05d}"
        pairs.append({"id": pid, **pair})
        labels.append({"id": pid, **label})
    return pairs, labels
