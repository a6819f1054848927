"""The ranker registry: name -> a function of the run that ranks every pair, best first.

Every attribution method follows one protocol: shared work is cached once in :class:`RankingInputs` (the datapoint
vectors and behaviour vectors through M0, which the probe and the bank both score), then each ranker returns a
:class:`~pairtrace.attribute.Ranking` and what it cost. Run configs name rankers (``attribution.methods``,
``validation.headline_methods``) and are checked against :data:`RANKERS`.

    @register_ranker("my_method")
    def rank_my_method(inputs: RankingInputs) -> tuple[Ranking, CostRecord]: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pairtrace.experiment.context import RunContext

if TYPE_CHECKING:
    from pairtrace.attribute import Ranking
    from pairtrace.cost import CostMeter, CostRecord

Ranker = Callable[["RankingInputs"], tuple["Ranking", "CostRecord"]]
RANKERS: dict[str, Ranker] = {}
"""Registered rankers, in the order a run computes them."""


def register_ranker(name: str) -> Callable[[Ranker], Ranker]:
    """Register ``fn`` as the ranker ``name`` (decorator)."""

    def decorate(fn: Ranker) -> Ranker:
        RANKERS[name] = fn
        return fn

    return decorate


@dataclass
class AttributionVectors:
    """The shared work of the activation rankers: datapoint vectors (a store on disk) and behaviour vectors, and
    the cost meter that timed them."""

    store: Any
    behaviour: Any
    meter: CostMeter


class RankingInputs:
    """What a ranker receives: the run context, the behaviour triples, the layers, and the shared vectors."""

    def __init__(self, ctx: RunContext, triples: list[Any], layers: list[int], score_layer: int,
                 vectors: AttributionVectors) -> None:
        self.ctx = ctx
        self.triples = triples
        self.layers = layers
        self.score_layer = score_layer
        self.vectors = vectors


def compute_attribution_vectors(ctx: RunContext, triples: list[Any], layers: list[int]) -> AttributionVectors:
    """Datapoint vectors of every pair and behaviour vectors of every triple through M0, timed for the probe's
    cost (with the token counts of its FLOPs estimate)."""
    from pairtrace.behaviour import compute_behaviour_vectors, save_behaviour_vectors
    from pairtrace.cost import CostMeter, count_parameters
    from pairtrace.models import build_teacher_forcing
    from pairtrace.vectors import compute_datapoint_vectors

    cfg = ctx.config.attribution
    pairs, m0 = ctx.pairs(), ctx.model("m0")
    deepest = max(layers)
    meter = CostMeter("probe", params_forward=count_parameters(m0.model, deepest, include_head=False))
    with meter.measure():
        store = compute_datapoint_vectors(m0, pairs, ctx.path("vectors"), layers=layers, shard_size=cfg.shard_size,
                                          batch_tokens=cfg.batch_tokens, max_length=cfg.max_length,
                                          prompt_sharing=cfg.prompt_sharing, progress=ctx.progress,
                                          resume=False, response_tokens=cfg.response_tokens)
        behaviour = compute_behaviour_vectors(m0, triples, layers=layers, max_length=cfg.max_length,
                                              progress=ctx.progress, response_tokens=cfg.response_tokens)
    save_behaviour_vectors(behaviour, ctx.path("behaviour"))
    shared = meter.wall_s
    # token counts for the FLOPs estimate (not timed: bookkeeping only)
    prompts = [p.prompt for p in pairs] * 2 + [t.prompt for t in triples] * 2
    responses = ([p.chosen for p in pairs] + [p.rejected for p in pairs] + [t.r1 for t in triples]
                 + [t.r0 for t in triples])
    n_tokens = sum(len(tf.input_ids) for tf in build_teacher_forcing(m0, prompts, responses, cfg.max_length,
                                                                      cfg.response_tokens))
    meter.add_forward(n_tokens, passes=len(responses))
    meter.add_note(f"datapoint + behaviour vectors through layers 0..{deepest} ({shared:.1f} s), then cosine")
    return AttributionVectors(store=store, behaviour=behaviour, meter=meter)


def _rank_by_cosine(inputs: RankingInputs, method: str) -> tuple[Ranking, CostRecord]:
    from pairtrace.attribute import AttributionConfig, compute_attribution

    meter = inputs.vectors.meter.fork(method)  # the shared vectors count for both the probe and the bank
    with meter.measure():
        ranking = compute_attribution(inputs.vectors.store, inputs.vectors.behaviour,
                                      AttributionConfig(method=method, layer=inputs.score_layer),
                                      pair_metadata=inputs.ctx.pairs(), progress=False)
    return ranking, meter.record()


@register_ranker("probe")
def rank_probe(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """The paper's method: cosine of each datapoint vector with the pooled behaviour vector."""
    return _rank_by_cosine(inputs, "probe")


@register_ranker("bank")
def rank_bank(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """The largest cosine of each datapoint vector with any per-prompt behaviour vector."""
    return _rank_by_cosine(inputs, "bank")


@register_ranker("gradient")
def rank_gradient(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """The LESS-for-DPO gradient baseline through M0."""
    from pairtrace.baselines.gradient import compute_gradient_ranking
    from pairtrace.cost import CostMeter

    ctx = inputs.ctx
    meter = CostMeter("gradient")
    ranking = compute_gradient_ranking(ctx.model("m0"), ctx.pairs(), inputs.triples, ctx.config.attribution.gradient,
                                       progress=ctx.progress, cost=meter)
    return ranking, meter.record()


@register_ranker("llm_judge")
def rank_llm_judge(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """The judge baseline: judged harmfulness of the chosen response minus the rejected one."""
    from pairtrace.baselines.llm_judge import compute_llm_judge_ranking
    from pairtrace.cost import CostMeter

    ctx = inputs.ctx
    meter = CostMeter("llm_judge")
    ranking = compute_llm_judge_ranking(ctx.pairs(), ctx.judge(), progress=ctx.progress, cost=meter,
                                        cache_path=ctx.path("rankings", "llm_judge", "judgements.jsonl"))
    return ranking, meter.record()


@register_ranker("random")
def rank_random(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """A seeded random order (the causal checks' control)."""
    from pairtrace.baselines.random import compute_random_ranking
    from pairtrace.cost import CostMeter

    meter = CostMeter("random")
    ranking = compute_random_ranking(inputs.ctx.pairs(), seed=inputs.ctx.config.attribution.random_seed, cost=meter)
    return ranking, meter.record()


@register_ranker("screen")
def rank_screen(inputs: RankingInputs) -> tuple[Ranking, CostRecord]:
    """The screen before training: behaviours built from examples through M0 only (``attribution.screen_examples``;
    no M1, no triples), ranked by cosine; the first behaviour's ranking is the method's. Every behaviour's
    screen (rankings, top pairs, enrichment, ``screen.html``) and library entry are saved under
    ``rankings/screen/``."""
    from pairtrace.behaviour_library import save_behaviour
    from pairtrace.cost import CostMeter, count_parameters
    from pairtrace.models import build_teacher_forcing
    from pairtrace.screen import compute_screen, compute_screen_stores, save_screen
    from pairtrace.screening import compute_example_behaviour, load_examples, parse_example_specs

    ctx, cfg = inputs.ctx, inputs.ctx.config.attribution
    specs = parse_example_specs(cfg.screen_examples)
    m0, pairs, root = ctx.model("m0"), ctx.pairs(), ctx.path("rankings", "screen")
    meter = CostMeter("screen", params_forward=count_parameters(m0.model, inputs.score_layer, include_head=False))
    with meter.measure():
        behaviours = [compute_example_behaviour(m0, s.name, load_examples(s.path), layer=inputs.score_layer,
                                                response_tokens=s.response_tokens, max_length=cfg.max_length,
                                                description=s.description, source=str(s.path)) for s in specs]
        shared = inputs.vectors.store
        stores = {shared.manifest.pooling.name: shared}
        stores.update(compute_screen_stores(m0, pairs, [b for b in behaviours if b.pooling.name not in stores],
                                            root / "vectors", batch_tokens=cfg.batch_tokens,
                                            max_length=cfg.max_length, progress=ctx.progress))
        result = compute_screen(stores, behaviours, pairs=pairs)
    for behaviour in behaviours:
        save_behaviour(root / "library", behaviour, overwrite=True)
    save_screen(result, root / "screen")
    examples = [t for s in specs for t in load_examples(s.path)]  # FLOPs estimate, untimed; all tokens: an upper bound
    prompts = [t.prompt for t in examples] * 2
    responses = [t.r1 for t in examples] + [t.r0 for t in examples]
    extra_stores = len({b.pooling.name for b in behaviours} - {shared.manifest.pooling.name})
    prompts += [p.prompt for p in pairs] * 2 * extra_stores  # the stores of datapoint vectors at other poolings
    responses += ([p.chosen for p in pairs] + [p.rejected for p in pairs]) * extra_stores
    n_tokens = sum(len(tf.input_ids) for tf in build_teacher_forcing(m0, prompts, responses, cfg.max_length))
    meter.add_forward(n_tokens, passes=len(responses))
    meter.add_note(f"{len(behaviours)} behaviour(s) from {len(examples)} examples through M0, datapoint vectors "
                   "at each pooling the shared store lacks, then cosine (no M1, no triples)")
    return result.behaviours[specs[0].name].ranking, meter.record()


def compute_rankings(ctx: RunContext, triples: list[Any]) -> dict[str, Any]:
    """The rankings stage: the shared vectors, then every configured ranker in registry order.

    Returns:
        ``n_pairs``, ``layers``, ``layer`` (the score layer), ``rankings`` (method -> ranking path) and ``cost``
        (one record per method; also saved as ``cost.json``).
    """
    from pairtrace.attribute import save_ranking
    from pairtrace.cost import save_costs
    from pairtrace.models import resolve_layers

    cfg = ctx.config.attribution
    layers = resolve_layers(cfg.layers, ctx.model("m0").n_layers)
    score_layer = cfg.layer if cfg.layer is not None else layers[0]
    inputs = RankingInputs(ctx, triples, layers, score_layer, compute_attribution_vectors(ctx, triples, layers))
    out: dict[str, Any] = {"n_pairs": len(ctx.pairs()), "layers": layers, "layer": score_layer, "rankings": {}}
    costs = []
    for method, ranker in RANKERS.items():
        if method in cfg.methods:
            ranking, cost = ranker(inputs)
            out["rankings"][method] = str(save_ranking(ranking, ctx.path("rankings", method)))
            costs.append(cost)
    save_costs(costs, ctx.path("cost.json"))
    out["cost"] = [asdict(c) for c in costs]
    return out
