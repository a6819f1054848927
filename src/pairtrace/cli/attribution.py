"""Commands of the attribution method: datapoint and behaviour vectors, rankings, sources, discovery, steering."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pairtrace.cli.common import (
    MODEL,
    SAMPLING,
    ConfigOpt,
    apply_threads,
    check_out_dir,
    command,
    load_cli_model,
    load_cli_pairs,
    out_option,
    pick_input,
    require,
    say,
    threads_option,
    warn,
)
from pairtrace.errors import ConfigError
from pairtrace.generate import GenerationConfig
from pairtrace.model_spec import ModelSpec


@command(
    "vectors", model=MODEL,
    epilog=(
        "Examples:\n\n"
        "  pairtrace vectors data/mix.jsonl --model runs/organism/organism/m0 --out runs/vectors\n\n"
        "  pairtrace vectors allenai/olmo-2-1124-7b-preference-mix --data-revision SHA --split train "
        "--model allenai/OLMo-2-1124-7B-SFT --layers 20 --dtype bfloat16 --stream --out vec/\n\n"
        "  pairtrace vectors mix.parquet --model m0/ --shard $SLURM_ARRAY_TASK_ID/8 --out vec/\n\n"
        "  pairtrace vectors mix.parquet --model m0/ --backend ray --ray-workers 8 --ray-gpus-per-worker 1 --out vec/"
    ),
)
def vectors(
    pairs: str = typer.Argument(None, help="Pairs: JSONL(.gz), JSON, Parquet, saved dataset dir or hub id."),
    pairs_flag: str = typer.Option(None, "--pairs", help="The pairs, as a flag (instead of PAIRS)."),
    out: Path = out_option(help="Output directory (shards + manifest.json)."),
    layers: list[int] = typer.Option(None, "--layers", "--layer", "-l",
                                     help="Layer(s) k = hidden_states of index k; default 0.625 n."),
    split: str = typer.Option(None, help="Split of a saved dataset / hub dataset."),
    data_revision: str = typer.Option(None, help="Revision of a hub dataset (pin it for reproducibility)."),
    limit: int = typer.Option(None, min=1, help="Only the first N records."),
    strict: bool = typer.Option(False, help="Stop at the first bad record instead of skipping and counting."),
    stream: bool = typer.Option(False, help="Stream the pairs from disk (memory flat in the number of pairs)."),
    shard: str = typer.Option(None, help="Compute only part i of n ('i/n', 0-based, or 'auto' from SLURM/torchrun)."),
    backend: str = typer.Option("local", help="local | ray (a Ray cluster runs the shards)."),
    ray_workers: int = typer.Option(2, help="Ray actors (each loads the model once)."),
    ray_gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor."),
    ray_address: str = typer.Option(None, help="Ray cluster address (default: running or local cluster)."),
    shard_size: int = typer.Option(1024, help="Pairs per shard (the unit of resumption)."),
    batch_tokens: int = typer.Option(None, help="Token budget per forward batch (default: 2048 CPU, 32768 GPU)."),
    max_length: int = typer.Option(2048, min=2, help="Maximum tokens per sequence (at most the model's positions); "
                                   "prompts are truncated from the left, responses from the right."),
    response_tokens: int = typer.Option(None, help="Pool each response over its first N tokens (default: all)."),
    prompt_sharing: str = typer.Option("auto", help="auto | always | never: encode the shared prompt once."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder blocks that run."),
    store_dtype: str = typer.Option("float32", help="Storage dtype of the vectors: float32 | bfloat16 | float16."),
    threads: int = threads_option(),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Compute datapoint vectors v_d = mean(chosen) - mean(rejected) through M0 (resumable, shardable)."""
    pairs = pick_input(pairs, pairs_flag, "pairs")
    require(locals(), "pairs", "out")
    check_out_dir(out)
    apply_threads(threads)
    common = dict(layers=layers or None, shard_size=shard_size, batch_tokens=batch_tokens, max_length=max_length,
                  prompt_sharing=prompt_sharing, compile=compile, dtype=store_dtype, response_tokens=response_tokens)
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be local or ray, got {backend!r}")
    if stream and backend == "local":
        from pairtrace.vectors import compute_datapoint_vectors_from_source

        store = compute_datapoint_vectors_from_source(
            load_cli_model(model), pairs, out, split=split, revision=data_revision, strict=strict, limit=limit,
            shard=shard, **common,
        )
    else:
        pair_set = load_cli_pairs(pairs, "extract", split=split, revision=data_revision, strict=strict, limit=limit)
        if backend == "ray":
            from pairtrace.ray_backend import RayOptions, compute_datapoint_vectors_ray

            store = compute_datapoint_vectors_ray(
                model, pair_set, out, **common,
                options=RayOptions(num_workers=ray_workers, num_gpus_per_worker=ray_gpus_per_worker,
                                   address=ray_address),
            )
        else:
            from pairtrace.vectors import compute_datapoint_vectors

            store = compute_datapoint_vectors(load_cli_model(model), pair_set, out, shard=shard, **common)
    truncation = store.manifest.truncation
    if truncation.get("n_truncated_pairs"):
        warn(f"{truncation['n_truncated_pairs']} of {store.n} pair(s) were cut to fit "
             f"{truncation.get('effective_max_length')} tokens (prompts from the left, responses from the right; "
             f"--max-length {max_length}, the model's positions: {truncation.get('max_positions')})")
    say(f"datapoint vectors at layers {list(store.layers)} to {out}", ok="wrote")


@command("merge-vectors", options=False, epilog="Example:\n\n  pairtrace merge-vectors vec-part0 vec-part1 --out vec/")
def merge_vectors(
    parts: list[Path] = typer.Argument(..., help="Store directories written by `pairtrace vectors --shard i/n`."),
    out: Path = out_option(..., help="The merged, complete store."),
) -> None:
    """Join the parts of a sharded extraction into one store (manifests must agree)."""
    from pairtrace.shard import merge_stores

    check_out_dir(out)
    store = merge_stores(parts, out)
    say(f"{store.n} datapoint vectors into {out}", ok="merged")


@command(
    "behaviour", model=MODEL,
    epilog=(
        "Examples:\n\n"
        "  pairtrace behaviour runs/organism/behaviour/triples.jsonl --model runs/organism/organism/m0 "
        "--out runs/behaviour\n\n"
        "  pairtrace behaviour triples.jsonl --model m0/ --r1-model m1/ --layers 2 --out beh/"
    ),
)
def behaviour(
    triples: str = typer.Argument(None, help="JSONL of {prompt, r1, r0[, prompt_id]} triples."),
    out: Path = out_option(help="Output directory (behaviour.safetensors + JSON)."),
    layers: list[int] = typer.Option(None, "--layers", "--layer", "-l", help="Layer(s); default round(0.625 n)."),
    r1_model: str = typer.Option(None, help="Teacher-force r1 through this model (default: M0, as the paper); "
                                 "loaded with the same model options."),
    max_length: int = typer.Option(2048, min=2, help="Maximum tokens per sequence (at most the model's positions)."),
    response_tokens: int = typer.Option(None, help="Pool each response over its first N tokens (default: all; "
                                        "as the datapoint vectors)."),
    threads: int = threads_option(),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Compute behaviour vectors (per triple), the pooled probe and the per-prompt bank."""
    require(locals(), "triples", "out")
    check_out_dir(out)
    apply_threads(threads)
    from pairtrace.behaviour import compute_behaviour_vectors, load_triples, save_behaviour_vectors
    from pairtrace.errors import DataError

    triple_list = load_triples(triples)
    if not triple_list:
        raise DataError(f"{triples}: no triples (the file is empty)")
    loaded = load_cli_model(model)
    r1_loaded = load_cli_model(dataclasses.replace(model, name_or_path=r1_model), "--r1-model") if r1_model else None
    bv = compute_behaviour_vectors(loaded, triple_list, layers=layers or None, r1_model=r1_loaded,
                                   max_length=max_length, response_tokens=response_tokens)
    save_behaviour_vectors(bv, out)
    truncation = bv.metadata.get("truncation", {})
    if truncation.get("n_truncated_triples"):
        warn(f"{truncation['n_truncated_triples']} of {len(triple_list)} triple(s) were cut to fit "
             f"{truncation['effective_max_length']} tokens (prompts from the left, responses from the right; "
             f"--max-length {max_length}, the model's positions: {truncation.get('max_positions')})")
    say(f"probe + bank ({bv.bank.shape[0]} prompts, {len(triple_list)} triples) at layers {list(bv.layers)} to {out}",
        ok="wrote")


@command(
    "attribute",
    epilog=(
        "Examples:\n\n"
        "  pairtrace attribute --vectors runs/vectors --behaviour runs/behaviour --out runs/rank-probe\n\n"
        "  pairtrace attribute --vectors runs/vectors --behaviour runs/behaviour --method bank --out runs/rank-bank"
    ),
)
def attribute(
    vectors_dir: Path = typer.Option(None, "--vectors", help="Datapoint-vector directory from `pairtrace vectors`."),
    behaviour_dir: Path = typer.Option(None, "--behaviour", help="Directory from `pairtrace behaviour`."),
    out: Path = out_option(help="Output directory (ranking.parquet, ranking.jsonl)."),
    method: str = typer.Option("probe", help="probe | bank | mean."),
    layer: int = typer.Option(None, "--layer", "--layers", "-l",
                              help="Layer to score at (default: the first stored layer)."),
    chunk_rows: int = typer.Option(65536, help="Datapoint vectors per scoring chunk."),
    top: int = typer.Option(10, help="Print the N best-ranked pairs."),
    config: Path = ConfigOpt,
) -> None:
    """Rank pairs by cosine between datapoint vectors and behaviour vectors (best first)."""
    require(locals(), "vectors_dir", "behaviour_dir", "out")
    check_out_dir(out)
    from pairtrace.attribute import AttributionConfig, compute_attribution, save_ranking
    from pairtrace.behaviour import load_behaviour_vectors
    from pairtrace.store import VectorStore

    store = VectorStore.open(vectors_dir)
    bv = load_behaviour_vectors(behaviour_dir)
    ranking = compute_attribution(
        store, bv, AttributionConfig(method=method, layer=layer, chunk_rows=chunk_rows)
    )
    path = save_ranking(ranking, out)
    print_ranking(ranking, top)
    say(f"{path} ({ranking.metadata['n_nan']} pair(s) without a score, ranked last)", ok="wrote")


def print_ranking(ranking, top: int) -> None:
    """Show the best-ranked pairs as a table."""
    from rich.table import Table

    table = Table(title=f"top {top} by {ranking.metadata.get('method')} (layer {ranking.metadata.get('layer')})")
    for col in ("rank", "id", "score", "source", "chosen_model"):
        table.add_column(col)
    for rec in ranking.table.head(top).to_dict(orient="records"):
        table.add_row(str(rec["rank"]), str(rec["id"]), f"{rec['score']:.4f}", str(rec["source"]),
                      str(rec["chosen_model"]))
    Console().print(table)


@command("sources", epilog="Example:\n\n  pairtrace sources runs/organism/rankings/probe --k 192 --out runs/sources")
def sources(
    ranking: Path = typer.Argument(None, help="Ranking Parquet (or its directory)."),
    k: int = typer.Option(None, "--k", help="Size of the top set (e.g. the headline k)."),
    out: Path = out_option(help="Output directory."),
    p_max: float = typer.Option(0.01, help="Largest p-value for a source-ablation suggestion."),
    min_enrichment: float = typer.Option(2.0, help="Smallest enrichment for a source-ablation suggestion."),
    statistic: str = typer.Option(
        "scan", help="Test behind the suggestion: 'scan' (most enriched top slice up to k, minimum-hypergeometric "
        "p-value) or 'fixed' (the top-k itself)."),
    config: Path = ConfigOpt,
) -> None:
    """Which chosen models / rejected models / sources are over-represented in the top-k (hypergeometric test)."""
    require(locals(), "ranking", "k", "out")
    check_out_dir(out)
    from pairtrace.sources import run_sources

    summary = run_sources(ranking, k, out, p_max=p_max,
                          min_enrichment=min_enrichment, statistic=statistic)
    say(f"{out}; suggested source ablation: {(summary.get('ablation') or {}).get('chosen_models')}", ok="wrote")


@command(
    "discover", model=MODEL,
    epilog=(
        "Example:\n\n  pairtrace discover --model runs/organism/organism/m0 --vectors runs/organism/vectors "
        "--generations-m0 g0.jsonl --generations-m1 g1.jsonl --pairs mix.jsonl --out runs/discover"
    ),
)
def discover(
    vectors_dir: Path = typer.Option(None, "--vectors", help="Datapoint-vector directory (made with --model)."),
    generations_m0: Path = typer.Option(None, help="M0 generations on a broad prompt set (JSONL)."),
    generations_m1: Path = typer.Option(None, help="M1 generations on the same prompts (JSONL)."),
    pairs: str = typer.Option(None, help="The preference pairs of the vector store."),
    out: Path = out_option(help="Output directory."),
    linkage: str = typer.Option("ward", help="ward (on L2-normalised profiles) | average (cosine distance)."),
    n_clusters: int = typer.Option(None, help="Fixed number of pair clusters (default: automatic)."),
    top_k_per_prompt: int = typer.Option(None, help="Score only the union of each prompt's top-K pairs."),
    auto_k: str = typer.Option(None, help="Automatic clustering: hdbscan (dense groups; the default) | stability "
                                          "(a height per branch) | gap | calinski_harabasz | silhouette."),
    min_cluster_size: int = typer.Option(None, help="Smallest cluster (default: hdbscan 4% of the items, at least "
                                                    "5; stability 1%, 2 to 10)."),
    max_cluster_fraction: float = typer.Option(None, help="hdbscan and stability: largest cluster as a share of the "
                                                          "items (default 0.5; 1 = no limit)."),
    also_response_tokens: list[str] = typer.Option(
        None, help="A further view per value: response means over the first N tokens ('all': every token); "
                   "repeat the flag or separate values with commas (8,all)."),
    labels: Path = typer.Option(None, help="Optional ground truth, only to report purity/recall."),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Find behaviours nobody named: cluster the behaviour x datapoint cosine matrix, summarise each cluster."""
    require(locals(), "vectors_dir", "generations_m0", "generations_m1", "pairs", "out")
    check_out_dir(out)
    from pairtrace.discover import DiscoverConfig, run_discover

    given = {name: value for name, value in (("max_cluster_fraction", max_cluster_fraction), ("auto_k", auto_k))
             if value is not None}  # the rest: DiscoverConfig's defaults
    settings = DiscoverConfig(linkage=linkage, n_clusters=n_clusters, top_k_per_prompt=top_k_per_prompt,
                              min_cluster_size=min_cluster_size, **given,
                              also_response_tokens=parse_response_token_views(also_response_tokens or []))
    summary = run_discover(model, vectors_dir, generations_m0, generations_m1, pairs, out, settings,
                           labels_path=labels)
    say(f"{out}: {len(summary.get('pair_clusters', []))} pair clusters", ok="wrote")
    for view in summary.get("views", []):
        say(f"  view {view['name']}: {len(view.get('pair_clusters', []))} pair clusters ({out}/{view['dir']})")


def parse_response_token_views(values: list[Any]) -> list[int | None]:
    """``["all", "4"]`` or ``["all,4"]`` → ``[None, 4]`` (ints and None pass through, from a YAML config)."""
    out: list[int | None] = []
    split = [part for value in values
             for part in (value.split(",") if isinstance(value, str) else [value])]
    for value in split:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "none", "null")):
            out.append(None)
            continue
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"--also-response-tokens: {value!r} is neither a number of tokens nor 'all'") from None
    return out


@command(
    "steer", model=MODEL, sampling=SAMPLING,
    epilog=(
        "Example:\n\n  pairtrace steer --model runs/organism/organism/m0 --behaviour runs/organism/behaviour "
        "--prompts runs/organism/prompts/probe.jsonl --alphas 0 --alphas 0.5 --alphas 1 --out runs/steer"
    ),
)
def steer(
    behaviour_dir: Path = typer.Option(None, "--behaviour", help="Behaviour vectors from `pairtrace behaviour`."),
    prompts: Path = typer.Option(None, help="Prompt records with condition trigger / no_trigger."),
    out: Path = out_option(help="Output directory."),
    alphas: list[float] = typer.Option([0.0, 0.25, 0.5, 1.0], help="Strengths, in units of the residual norm."),
    layers: list[int] = typer.Option(None, "--layers", "--layer", "-l", help="Layers (default: the vectors' layers)."),
    last_prompt_token: bool = typer.Option(
        False, help="Also steer the last prompt position, which predicts the first response token."
    ),
    model: ModelSpec = None,
    sampling: GenerationConfig = None,
    config: Path = ConfigOpt,
) -> None:
    """Steering check: add alpha * v to M0's residual stream at layer k on generated positions; behaviour rates."""
    require(locals(), "behaviour_dir", "prompts", "out")
    check_out_dir(out)
    from pairtrace.steer import SteerConfig, run_steer

    settings = SteerConfig(alphas=alphas, layers=layers or None, include_last_prompt_token=last_prompt_token)
    summary = run_steer(model, behaviour_dir, prompts, out, alphas=alphas, layers=layers or None, config=settings,
                        generation_config=sampling)
    say(f"{out} ({len(summary.get('results', []))} rates)", ok="wrote")
