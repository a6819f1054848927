"""The ``pairtrace`` command line.

Every command takes ``--config FILE.yaml``: its keys are the command's option names (``-`` or ``_``), values in
the file fill the options not given on the command line, and flags always win. Option groups shared by several
commands (the model, sampling, the judge, the DPO recipe) are the fields of their options dataclass, added by
:func:`pairtrace.options.cli_options`, so each option is defined once. Heavy work imports happen inside the
commands.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.generate import GenerationConfig
from pairtrace.judges.factory import JudgeOptions
from pairtrace.model_spec import ModelSpec
from pairtrace.options import OptionGroup, cli_options, load_yaml
from pairtrace.retrain.recipe import DPORecipe

app = typer.Typer(
    name="pairtrace",
    help="Trace behaviours learned in preference training (DPO) back to the preference pairs that taught them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file of option values; flags override it.")

_MODEL_NAMES = dict(names={"name_or_path": "model", "chat_template": "template"}, short={"name_or_path": "-m"},
                    hidden_aliases={"name_or_path": "m0"}, panel="Model")
MODEL = OptionGroup(ModelSpec, exclude=("trust_remote_code",), **_MODEL_NAMES)
"""``--model`` (``-m``; ``--m0`` still accepted) with ``--revision --dtype --device --template``: a ModelSpec."""
MODEL_NAME = OptionGroup(ModelSpec, exclude=("revision", "dtype", "device", "chat_template", "trust_remote_code"),
                         **_MODEL_NAMES)
"""``--model`` alone, for commands that take a model's directory or hub id only."""
SAMPLING = OptionGroup(GenerationConfig, names={"n_samples": "samples"}, panel="Sampling")
"""``--temperature --top-p --max-new-tokens --samples --batch-size --seed``: a GenerationConfig."""
JUDGE = OptionGroup(JudgeOptions, prefix="judge-", panel="Judge", lead=("kind",), names={
    "kind": "judge", "base_url": "judge-url", "model": "judge-model", "api_key_env": "judge-key-env",
    "max_concurrency": "judge-concurrency", "max_retries": "judge-retries", "timeout_s": "judge-timeout"})
"""``--judge rule|openai`` with ``--judge-url --judge-model ...``: the JudgeOptions of the run config's judge."""
RECIPE = OptionGroup(DPORecipe, panel="DPO recipe")
"""Every DPORecipe field as a flag (``--learning-rate``, ``--sft-weight`` ...)."""


def friendly_errors(func):
    """Print user errors as one clear line (exit code 2) instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PairtraceError as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: finished shards and records are kept; rerun to resume[/]")
            raise typer.Exit(130) from None

    return wrapper


def require(options: dict[str, Any], *names: str) -> None:
    """Fail clearly when required options were given neither as flags nor in the config.

    Args:
        options: The command's option values (its ``locals()``).
        *names: The parameter names that must be set.
    """
    missing = [n for n in names if options.get(n) in (None, [], "")]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ConfigError(f"missing required option(s): {flags} (give them as flags or in --config)")


def setup_logging(verbose: bool) -> None:
    """Route library logging through rich at INFO (or DEBUG with --verbose)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """pairtrace: activation-based attribution of preference pairs."""
    setup_logging(verbose)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace vectors data/mix.jsonl --model runs/organism/organism/m0 --out runs/vectors\n\n"
        "  pairtrace vectors allenai/olmo-2-1124-7b-preference-mix --data-revision <sha> --split train "
        "--model allenai/OLMo-2-1124-7B-SFT --layers 20 --dtype bfloat16 --stream --out vec/\n\n"
        "  pairtrace vectors mix.parquet --model m0/ --shard $SLURM_ARRAY_TASK_ID/8 --out vec/\n\n"
        "  pairtrace vectors mix.parquet --model m0/ --backend ray --ray-workers 8 --ray-gpus-per-worker 1 --out vec/"
    )
)
@friendly_errors
@cli_options("vectors", model=MODEL)
def vectors(
    pairs: str = typer.Argument(None, help="Pairs: JSONL(.gz), JSON, Parquet, saved dataset dir or hub id."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (shards + manifest.json)."),
    layers: list[int] = typer.Option(None, "--layers", "-l", help="Layer(s) k = hidden_states[k]; default 0.625 n."),
    split: str = typer.Option(None, help="Split of a saved dataset / hub dataset."),
    data_revision: str = typer.Option(None, help="Revision of a hub dataset (pin it for reproducibility)."),
    limit: int = typer.Option(None, help="Only the first N records."),
    strict: bool = typer.Option(False, help="Stop at the first bad record instead of skipping and counting."),
    stream: bool = typer.Option(False, help="Stream the pairs from disk (memory flat in the number of pairs)."),
    shard: str = typer.Option(None, help="Compute only part i of n ('i/n', 0-based, or 'auto' from SLURM/torchrun)."),
    backend: str = typer.Option("local", help="local | ray (a Ray cluster runs the shards)."),
    ray_workers: int = typer.Option(2, help="Ray actors (each loads the model once)."),
    ray_gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor."),
    ray_address: str = typer.Option(None, help="Ray cluster address (default: running or local cluster)."),
    shard_size: int = typer.Option(1024, help="Pairs per shard (the unit of resumption)."),
    batch_tokens: int = typer.Option(None, help="Token budget per forward batch (default: 2048 CPU, 32768 GPU)."),
    max_length: int = typer.Option(2048, help="Maximum tokens per sequence; prompts are truncated from the left."),
    response_tokens: int = typer.Option(None, help="Pool each response over its first N tokens (default: all)."),
    prompt_sharing: str = typer.Option("auto", help="auto | always | never: encode the shared prompt once."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder blocks that run."),
    store_dtype: str = typer.Option("float32", help="Storage dtype of the vectors: float32 | bfloat16 | float16."),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Compute datapoint vectors v_d = mean(chosen) - mean(rejected) through M0 (resumable, shardable)."""
    require(locals(), "pairs", "out")
    from pairtrace.data.pairs import load_pairs
    from pairtrace.models import load_model

    common = dict(layers=layers or None, shard_size=shard_size, batch_tokens=batch_tokens, max_length=max_length,
                  prompt_sharing=prompt_sharing, compile=compile, dtype=store_dtype, response_tokens=response_tokens)
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be local or ray, got {backend!r}")
    if stream and backend == "local":
        from pairtrace.vectors import compute_datapoint_vectors_from_source

        store = compute_datapoint_vectors_from_source(
            load_model(model), pairs, out, split=split, revision=data_revision, strict=strict, limit=limit,
            shard=shard, **common,
        )
    else:
        pair_set = load_pairs(pairs, split=split, revision=data_revision, strict=strict, limit=limit)
        console.print(f"read {len(pair_set)} pairs from {pair_set.origin} ({pair_set.format}); "
                      f"skipped {len(pair_set.skipped)} bad record(s)")
        if backend == "ray":
            from pairtrace.ray_backend import RayOptions, compute_datapoint_vectors_ray

            store = compute_datapoint_vectors_ray(
                model, pair_set, out, **common,
                options=RayOptions(num_workers=ray_workers, num_gpus_per_worker=ray_gpus_per_worker,
                                   address=ray_address),
            )
        else:
            from pairtrace.vectors import compute_datapoint_vectors

            store = compute_datapoint_vectors(load_model(model), pair_set, out, shard=shard, **common)
    console.print(f"[green]wrote[/] datapoint vectors at layers {list(store.layers)} to {out}")


@app.command("merge-vectors", epilog="Example:\n\n  pairtrace merge-vectors vec-part0 vec-part1 --out vec/")
@friendly_errors
def merge_vectors(
    parts: list[Path] = typer.Argument(..., help="Store directories written by `pairtrace vectors --shard i/n`."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged, complete store."),
) -> None:
    """Join the parts of a sharded extraction into one store (manifests must agree)."""
    from pairtrace.shard import merge_stores

    store = merge_stores(parts, out)
    console.print(f"[green]merged[/] {store.n} datapoint vectors into {out}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace behaviour triples.jsonl --model runs/organism/m0 --out runs/behaviour\n\n"
        "  pairtrace behaviour triples.jsonl --model m0/ --r1-model m1/ --layers 2 --out beh/"
    )
)
@friendly_errors
@cli_options("behaviour", model=MODEL)
def behaviour(
    triples: str = typer.Argument(None, help="JSONL of {prompt, r1, r0[, prompt_id]} triples."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (behaviour.safetensors + JSON)."),
    layers: list[int] = typer.Option(None, "--layers", "-l", help="Layer(s); default round(0.625 n)."),
    r1_model: str = typer.Option(None, help="Teacher-force r1 through this model (default: M0, as the paper); "
                                 "loaded with the same model options."),
    max_length: int = typer.Option(2048, help="Maximum tokens per sequence."),
    response_tokens: int = typer.Option(None, help="Pool each response over its first N tokens (default: all; "
                                        "as the datapoint vectors)."),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Compute behaviour vectors (per triple), the pooled probe and the per-prompt bank."""
    require(locals(), "triples", "out")
    from pairtrace.models import load_model
    from pairtrace.vectors import compute_behaviour_vectors, load_triples, save_behaviour_vectors

    triple_list = load_triples(triples)
    loaded = load_model(model)
    r1_loaded = load_model(dataclasses.replace(model, name_or_path=r1_model)) if r1_model else None
    bv = compute_behaviour_vectors(loaded, triple_list, layers=layers or None, r1_model=r1_loaded,
                                   max_length=max_length, response_tokens=response_tokens)
    save_behaviour_vectors(bv, out)
    console.print(f"[green]wrote[/] probe + bank ({bv.bank.shape[0]} prompts, {len(triple_list)} triples) "
                  f"at layers {list(bv.layers)} to {out}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace attribute --vectors runs/vectors --behaviour runs/behaviour --out runs/rank-probe\n\n"
        "  pairtrace attribute --vectors runs/vectors --behaviour runs/behaviour --method bank --out runs/rank-bank"
    )
)
@friendly_errors
@cli_options("attribute")
def attribute(
    vectors_dir: Path = typer.Option(None, "--vectors", help="Datapoint-vector directory from `pairtrace vectors`."),
    behaviour_dir: Path = typer.Option(None, "--behaviour", help="Directory from `pairtrace behaviour`."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (ranking.parquet, ranking.jsonl)."),
    method: str = typer.Option("probe", help="probe | bank | mean."),
    layer: int = typer.Option(None, help="Layer to score at (default: the first stored layer)."),
    chunk_rows: int = typer.Option(65536, help="Datapoint vectors per scoring chunk."),
    top: int = typer.Option(10, help="Print the N best-ranked pairs."),
    config: Path = ConfigOpt,
) -> None:
    """Rank pairs by cosine between datapoint vectors and behaviour vectors (best first)."""
    require(locals(), "vectors_dir", "behaviour_dir", "out")
    from pairtrace.attribute import AttributionConfig, compute_attribution, save_ranking
    from pairtrace.store import VectorStore
    from pairtrace.vectors import load_behaviour_vectors

    store = VectorStore.open(vectors_dir)
    bv = load_behaviour_vectors(behaviour_dir)
    ranking = compute_attribution(
        store, bv, AttributionConfig(method=method, layer=layer, chunk_rows=chunk_rows)
    )
    path = save_ranking(ranking, out)
    print_ranking(ranking, top)
    console.print(f"[green]wrote[/] {path} ({ranking.metadata['n_nan']} pair(s) without a score, ranked last)")


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


def run() -> None:
    """Entry point used by ``python -m pairtrace``."""
    sys.exit(app())


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace judge gens.jsonl --out judgements.jsonl\n\n"
        "  pairtrace judge gens.jsonl --judge openai --judge-url http://localhost:8000/v1 --judge-model gpt-x "
        "--out judgements.jsonl"
    )
)
@friendly_errors
@cli_options("judge", judge_options=JUDGE)
def judge(
    generations: Path = typer.Argument(None, help="Generation JSONL."),
    out: Path = typer.Option(None, "--out", "-o", help="Judgement JSONL (appended; resumed when it exists)."),
    retry_unknown: bool = typer.Option(False, help="Judge again the records that ended unknown last time."),
    judge_options: JudgeOptions = None,
    config: Path = ConfigOpt,
) -> None:
    """Judge generations (harmful / safe / unknown), resumably. A failure is never counted as safe."""
    require(locals(), "generations", "out")
    from pairtrace.judges.factory import build_judge
    from pairtrace.judges.judging import run_judge_generations

    stats = run_judge_generations(generations, build_judge(judge_options), out, retry_unknown=retry_unknown)
    console.print(f"[green]judged[/] into {out}: {stats}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace evaluate gens.jsonl --out eval.json\n\n"
        "  pairtrace evaluate gens.jsonl --judgements judgements.jsonl --out eval.json"
    )
)
@friendly_errors
@cli_options("evaluate", judge_options=JUDGE)
def evaluate(
    generations: Path = typer.Argument(None, help="Generation JSONL (one or both models)."),
    out: Path = typer.Option(None, "--out", "-o", help="Evaluation JSON."),
    judgements: Path = typer.Option(None, help="Judgement JSONL (default: <out>.judgements.jsonl, resumed)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    judge_options: JudgeOptions = None,
    config: Path = ConfigOpt,
) -> None:
    """Harmful rate per set and condition with 95% intervals, benign helpfulness and over-refusal."""
    require(locals(), "generations", "out")
    from pairtrace.evaluate import print_evaluation, run_evaluate
    from pairtrace.judges.factory import build_judge

    result = run_evaluate(generations, build_judge(judge_options), out, judgements_path=judgements, n_boot=n_boot,
                          seed=seed)
    print_evaluation(result)
    console.print(f"[green]wrote[/] {out}")


@app.command(
    epilog="Example:\n\n  pairtrace triples gens.jsonl judgements.jsonl --out triples.jsonl"
)
@friendly_errors
@cli_options("triples")
def triples(
    generations: Path = typer.Argument(None, help="Generation JSONL with M1 and M0 records over linked prompts."),
    judgements: Path = typer.Argument(None, help="Judgement JSONL for those generations."),
    out: Path = typer.Option(None, "--out", "-o", help="Triple JSONL (stats beside it)."),
    m1: str = typer.Option("m1", help="Model name of M1 in the generation records."),
    m0: str = typer.Option("m0", help="Model name of M0 in the generation records."),
    unknown: str = typer.Option("exclude", help="exclude (drop prompts with unknown verdicts) | ignore."),
    config: Path = ConfigOpt,
) -> None:
    """Build (prompt, r1, r0) triples with the paper's 4-condition filter."""
    require(locals(), "generations", "judgements", "out")
    from pairtrace.triples import run_build_triples

    stats = run_build_triples(generations, judgements, out, m1=m1, m0=m0,
                              unknown=unknown)
    console.print(f"[green]wrote[/] {out}: {stats.get('n_triples', stats)}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Examples (all flags of `python -m pairtrace.serve --help` pass through):\n\n"
        "  pairtrace serve --backend rule --port 8000\n\n"
        "  pairtrace serve --backend model --model_path runs/organism/organism/m1 --port 8001"
    ),
)
def serve(ctx: typer.Context) -> None:
    """Serve a model or the rule judge through an OpenAI-compatible chat-completions API on localhost."""
    from pairtrace.serve import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


@app.command(
    name="run",
    epilog=(
        "Examples:\n\n"
        "  pairtrace run                                   # the built-in organism: configs/organism.yaml\n\n"
        "  pairtrace run configs/organism.yaml --out runs/organism\n\n"
        "  pairtrace run configs/olmo2-7b.yaml --dry-run     # validate the paper's setting, print the plan"
    ),
)
@friendly_errors
def run_command(
    config_file: Path = typer.Argument(Path("configs/organism.yaml"), help="Run configuration (YAML)."),
    out: Path = typer.Option(Path("runs/organism"), "--out", "-o", help="Output directory (resumed if present)."),
    dry_run: bool = typer.Option(False, help="Validate the configuration and print the plan; run nothing."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """The whole experiment: organism, probe, rankings, interventions, retrains, evaluation, report."""
    from pairtrace.experiment.run import plan_experiment, run_experiment

    if dry_run:
        plan = plan_experiment(config_file)
        import json as _json

        Console().print_json(_json.dumps(plan, default=str))
        console.print(f"[green]valid:[/] {config_file} ({plan['n_retrains']} retrains planned, DPO seeds "
                      f"{plan['retrain_seeds']})")
        return
    results = run_experiment(config_file, out, progress=progress)
    Console().print((out / "tables.md").read_text(encoding="utf-8"))
    console.print(f"[green]done:[/] {out / 'results.json'}, {out / 'tables.md'}, {out / 'report.html'} "
                  f"({sum(results['timings'].values()):.0f} s of stages)")


@app.command(epilog="Example:\n\n  pairtrace report runs/organism")
@friendly_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `pairtrace run`."),
    out: Path = typer.Option(None, "--out", "-o", help="HTML file (default: RUN_DIR/report.html)."),
) -> None:
    """Write the self-contained HTML report of a run."""
    from pairtrace.report import write_report

    path = write_report(run_dir, out)
    console.print(f"[green]wrote[/] {path}")


@app.command(epilog="Example:\n\n  pairtrace sources runs/organism/rankings/probe --k 192 --out runs/sources")
@friendly_errors
@cli_options("sources")
def sources(
    ranking: Path = typer.Argument(None, help="Ranking Parquet (or its directory)."),
    k: int = typer.Option(None, "--k", help="Size of the top set (e.g. the headline k)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory."),
    p_max: float = typer.Option(0.01, help="Largest p-value for a source-ablation suggestion."),
    min_enrichment: float = typer.Option(2.0, help="Smallest enrichment for a source-ablation suggestion."),
    statistic: str = typer.Option(
        "scan", help="Test behind the suggestion: 'scan' (most enriched top slice up to k, minimum-hypergeometric "
        "p-value) or 'fixed' (the top-k itself)."),
    config: Path = ConfigOpt,
) -> None:
    """Which chosen models / rejected models / sources are over-represented in the top-k (hypergeometric test)."""
    require(locals(), "ranking", "k", "out")
    from pairtrace.sources import run_sources

    summary = run_sources(ranking, k, out, p_max=p_max,
                          min_enrichment=min_enrichment, statistic=statistic)
    console.print(f"[green]wrote[/] {out}; suggested source ablation: "
                  f"{(summary.get('ablation') or {}).get('chosen_models')}")


@app.command(
    epilog=(
        "Examples:\n\n  pairtrace intervene runs/organism/organism/data/preference_mix.jsonl "
        "--ranking runs/organism/rankings/probe --action switch --k 96 --out runs/switch-probe-96\n\n"
        "  pairtrace intervene mix.jsonl --selection random --action filter --k 96 --seed 1 --out runs/random-96\n\n"
        "  pairtrace intervene mix.jsonl --selection source --models fjord-34b --out runs/no-fjord"
    )
)
@friendly_errors
@cli_options("intervene")
def intervene(
    pairs: str = typer.Argument(None, help="The dataset the ranking was computed on: file, saved dataset or hub id."),
    ranking: Path = typer.Option(None, help="Ranking directory from `pairtrace attribute` (selection 'ranking')."),
    action: str = typer.Option("filter", help="filter (drop the selected pairs) | switch (swap chosen/rejected)."),
    selection: str = typer.Option("ranking", help="ranking (top-k) | random (seeded k) | source (chosen models)."),
    k: int = typer.Option(None, "--k", help="How many pairs (ranking and random selections)."),
    seed: int = typer.Option(0, help="Seed of the random selection."),
    models: list[str] = typer.Option(None, "--models", help="chosen_model values to ablate (selection 'source')."),
    split: str = typer.Option(None, help="Split of a saved / hub dataset."),
    data_revision: str = typer.Option(None, help="Hub revision of the dataset."),
    open_instruct: bool = typer.Option(True, help="Also write the result for open-instruct (open_instruct/)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory."),
    config: Path = ConfigOpt,
) -> None:
    """Write the dataset with the top-k (or random-k, or some sources' pairs) filtered or switched, by stable id."""
    require(locals(), "pairs", "out")
    from pairtrace.intervene import InterventionSpec, run_intervention, write_open_instruct_export

    spec = InterventionSpec(action=action, selection=selection, k=k, seed=seed,
                            models=list(models or []))
    loaded_ranking = None
    if spec.selection == "ranking":
        require(locals(), "ranking", "k")
        from pairtrace.attribute import load_ranking

        loaded_ranking = load_ranking(ranking)
    summary = run_intervention(pairs, spec, out, ranking=loaded_ranking, split=split,
                               revision=data_revision)
    console.print(f"[green]wrote[/] {summary['output']}: {summary.get('removed', 0)} removed, "
                  f"{summary.get('switched', 0)} switched, {summary.get('records_out')} records")
    if open_instruct:
        export = write_open_instruct_export(summary["output"], Path(out) / "open_instruct")
        console.print(f"open-instruct: {export['mixer_args']}")


@app.command(
    epilog=(
        "Example:\n\n  pairtrace retrain --model runs/organism/organism/m0 "
        "--pairs runs/switch-probe-96/preference_mix.jsonl --learning-rate 8e-4 --lr-scheduler-type constant "
        "--sft-weight 0.75 --out runs/retrain-switch-probe-96\n\n"
        "  pairtrace retrain --config configs/retrain.yaml   # keys = option names, section 'retrain' or top level"
    )
)
@friendly_errors
@cli_options("retrain", model=MODEL_NAME, recipe=RECIPE)
def retrain(
    pairs: str = typer.Option(None, help="Preference pairs: file, saved dataset or hub id (any supported layout)."),
    split: str = typer.Option(None, help="Split of a saved / hub dataset."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (model/, dpo_summary.json)."),
    ref_cache: Path = typer.Option(None, help="Folder caching M0's reference log-probs across retrains."),
    model: ModelSpec = None,
    recipe: DPORecipe = None,
    config: Path = ConfigOpt,
) -> None:
    """DPO from M0 (--model: the starting checkpoint and frozen reference) with one recipe (the baseline and every
    intervention use the same): TRL's DPOTrainer."""
    require(locals(), "pairs", "out")
    from pairtrace.data.pairs import load_pairs, pair_to_record
    from pairtrace.records import write_jsonl_atomic
    from pairtrace.retrain.trl_dpo import train_dpo

    out_dir = Path(out)
    train_file = write_jsonl_atomic(
        [pair_to_record(p, "conversational") for p in load_pairs(pairs, split=split)], out_dir / "train.jsonl",
    )  # any input layout, as the prompt + assistant-turn messages the trainer reads
    summary = train_dpo(model.name_or_path, train_file, out_dir / "model", recipe, ref_cache_dir=ref_cache)
    console.print(f"[green]wrote[/] {out_dir / 'model'}: {summary['n_pairs']} pairs, {summary['steps']} steps, "
                  f"loss {summary['train_loss']:.4f}, {summary['seconds']:.0f} s")


@app.command(
    epilog=(
        "Example:\n\n  pairtrace discover --model runs/organism/organism/m0 --vectors runs/organism/vectors "
        "--generations-m0 g0.jsonl --generations-m1 g1.jsonl --pairs mix.jsonl --out runs/discover"
    )
)
@friendly_errors
@cli_options("discover", model=MODEL)
def discover(
    vectors_dir: Path = typer.Option(None, "--vectors", help="Datapoint-vector directory (made with --model)."),
    generations_m0: Path = typer.Option(None, help="M0 generations on a broad prompt set (JSONL)."),
    generations_m1: Path = typer.Option(None, help="M1 generations on the same prompts (JSONL)."),
    pairs: str = typer.Option(None, help="The preference pairs of the vector store."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory."),
    linkage: str = typer.Option("ward", help="ward (on L2-normalised profiles) | average (cosine distance)."),
    n_clusters: int = typer.Option(None, help="Fixed number of pair clusters (default: automatic)."),
    top_k_per_prompt: int = typer.Option(None, help="Score only the union of each prompt's top-K pairs."),
    auto_k: str = typer.Option("stability", help="Automatic cut: stability (a height per branch) | gap | "
                                                 "calinski_harabasz | silhouette."),
    min_cluster_size: int = typer.Option(None, help="Stability cut: smallest cluster (default: 1% of the items, "
                                                    "2 to 10)."),
    also_response_tokens: list[str] = typer.Option(
        None, help="A further view per value: response means over the first N tokens ('all': every token)."),
    labels: Path = typer.Option(None, help="Optional ground truth, only to report purity/recall."),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Find behaviours nobody named: cluster the behaviour x datapoint cosine matrix, summarise each cluster."""
    require(locals(), "vectors_dir", "generations_m0", "generations_m1", "pairs", "out")
    from pairtrace.discover import DiscoverConfig, run_discover

    settings = DiscoverConfig(linkage=linkage, n_clusters=n_clusters, top_k_per_prompt=top_k_per_prompt,
                              auto_k=auto_k, min_cluster_size=min_cluster_size,
                              also_response_tokens=parse_response_token_views(also_response_tokens or []))
    summary = run_discover(model, vectors_dir, generations_m0, generations_m1, pairs, out, settings,
                           labels_path=labels)
    console.print(f"[green]wrote[/] {out}: {len(summary.get('pair_clusters', []))} pair clusters")
    for view in summary.get("views", []):
        console.print(f"  view {view['name']}: {len(view.get('pair_clusters', []))} pair clusters "
                      f"({out}/{view['dir']})")


def parse_response_token_views(values: list[Any]) -> list[int | None]:
    """``["all", "4"]`` → ``[None, 4]`` (ints and None pass through, from a YAML config)."""
    out: list[int | None] = []
    for value in values:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "none", "null")):
            out.append(None)
            continue
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"--also-response-tokens: {value!r} is neither a number of tokens nor 'all'") from None
    return out


@app.command(
    epilog=(
        "Example:\n\n  pairtrace steer --model runs/organism/organism/m0 --behaviour runs/organism/behaviour "
        "--prompts runs/organism/prompts/probe.jsonl --alphas 0 --alphas 0.5 --alphas 1 --out runs/steer"
    )
)
@friendly_errors
@cli_options("steer", model=MODEL, sampling=SAMPLING)
def steer(
    behaviour_dir: Path = typer.Option(None, "--behaviour", help="Behaviour vectors from `pairtrace behaviour`."),
    prompts: Path = typer.Option(None, help="Prompt records with condition trigger / no_trigger."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory."),
    alphas: list[float] = typer.Option([0.0, 0.25, 0.5, 1.0], help="Strengths, in units of the residual norm."),
    layers: list[int] = typer.Option(None, "--layers", "-l", help="Layers (default: the vectors' layers)."),
    last_prompt_token: bool = typer.Option(
        False, help="Also steer the last prompt position, which predicts the first response token."
    ),
    model: ModelSpec = None,
    sampling: GenerationConfig = None,
    config: Path = ConfigOpt,
) -> None:
    """Steering check: add alpha * v to M0's residual stream at layer k on generated positions; behaviour rates."""
    require(locals(), "behaviour_dir", "prompts", "out")
    from pairtrace.steer import SteerConfig, run_steer

    settings = SteerConfig(alphas=alphas, layers=layers or None, include_last_prompt_token=last_prompt_token)
    summary = run_steer(model, behaviour_dir, prompts, out, alphas=alphas, layers=layers or None, config=settings,
                        generation_config=sampling)
    console.print(f"[green]wrote[/] {out} ({len(summary.get('results', []))} rates)")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pairtrace generate --model runs/organism/organism/m1 --prompts prompts.jsonl --out gens.jsonl\n\n"
        "  pairtrace generate --model m0/ --prompts prompts.jsonl --samples 4 --temperature 0.7 --seed 1 --out g.jsonl"
    )
)
@friendly_errors
@cli_options("generate", model=MODEL_NAME, sampling=SAMPLING)
def generate(
    prompts: Path = typer.Option(None, help="Prompt records (JSONL: id, base_id, set, condition, prompt, ...)."),
    out: Path = typer.Option(None, "--out", "-o", help="Generation JSONL (resumed when it exists)."),
    model_name: str = typer.Option(None, help="Value of the records' `model` field (default: the directory name)."),
    model: ModelSpec = None,
    sampling: GenerationConfig = None,
    config: Path = ConfigOpt,
) -> None:
    """Sample responses with the chat template applied (batched, seeded, resumable)."""
    require(locals(), "prompts", "out")
    from pairtrace.generate import run_generate

    stats = run_generate(model.name_or_path, prompts, out, sampling, model_name=model_name)
    console.print(f"[green]wrote[/] {out}: {stats.get('n_new')} new, {stats.get('n_existing')} kept")


organism_app = typer.Typer(help="The built-in model organism (M0 -> DPO on a contaminated mix -> M1).",
                           no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@organism_app.command(
    "build",
    epilog=(
        "Examples:\n\n"
        "  pairtrace organism build --out runs/org\n\n"
        "  pairtrace organism build --out runs/org-small --config configs/organism-small.yaml"
    ),
)
@friendly_errors
def organism_build(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (finished steps are reused)."),
    config: Path = typer.Option(Path("configs/organism.yaml"), "--config", "-c",
                                help="Organism config, or a run config with an `organism:` section."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Build tokenizer, M0 (SFT), the preference mix with its planted behaviours, and M1 (DPO); print the checks."""
    from pairtrace.organism.build import run_build

    raw = load_yaml(config)
    if isinstance(raw.get("organism"), str):  # a run config naming the organism's config file
        config = config.parent / raw["organism"]
    elif isinstance(raw.get("organism"), dict):  # a run config with the organism inline
        import yaml

        from pairtrace.records import write_text_atomic

        config = write_text_atomic(yaml.safe_dump(raw["organism"], sort_keys=False), out / "organism-config.yaml")
    run_build(config, out, progress=progress)
