"""Commands of an experiment: the whole run, its report, interventions, retraining, the organism build."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pairtrace.cli.common import MODEL_NAME, RECIPE, ConfigOpt, app, command, console, out_option, require
from pairtrace.model_spec import ModelSpec
from pairtrace.options import OptionGroup, load_yaml
from pairtrace.retrain.engine_options import RetrainEngineOptions
from pairtrace.retrain.recipe import DPORecipe

RETRAIN_ENGINE = OptionGroup(RetrainEngineOptions, panel="Retrain engine", lead=("engine",))
"""``--engine inprocess|accelerate|command`` with ``--num-processes --accelerate-config --command ...``: the run
config's ``validation.retrain``."""


@command(
    "run", options=False,
    epilog=(
        "Examples:\n\n"
        "  pairtrace run                                   # the built-in organism: configs/organism.yaml\n\n"
        "  pairtrace run configs/organism.yaml --out runs/organism\n\n"
        "  pairtrace run configs/olmo2-7b.yaml --dry-run     # validate the paper's setting, print the plan"
    ),
)
def run_command(
    config_file: Path = typer.Argument(Path("configs/organism.yaml"), help="Run configuration (YAML)."),
    out: Path = out_option(Path("runs/organism"), help="Output directory (resumed if present)."),
    dry_run: bool = typer.Option(False, help="Validate the configuration and print the plan; run nothing."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """The whole experiment: organism, probe, rankings, interventions, retrains, evaluation, report."""
    from pairtrace.cli.common import check_out_dir
    from pairtrace.experiment.run import plan_experiment, run_experiment

    check_out_dir(out)
    if dry_run:
        plan = plan_experiment(config_file)
        import json as _json

        table = plan.pop("resource_plan", None)
        plan.get("resources", {}).pop("stages", None)  # the table below shows them
        Console().print_json(_json.dumps(plan, default=str))
        if table:
            Console(width=200).print("\n".join(table), markup=False, highlight=False)
        console.print(f"[green]valid:[/] {config_file} ({plan['n_retrains']} retrains planned, DPO seeds "
                      f"{plan['retrain_seeds']})")
        return
    results = run_experiment(config_file, out, progress=progress)
    Console().print((out / "tables.md").read_text(encoding="utf-8"))
    console.print(f"[green]done:[/] {out / 'results.json'}, {out / 'tables.md'}, {out / 'report.html'} "
                  f"({sum(results['timings'].values()):.0f} s of stages)")


@command("report", options=False, epilog="Example:\n\n  pairtrace report runs/organism")
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `pairtrace run`."),
    out: Path = out_option(help="HTML file (default: RUN_DIR/report.html)."),
) -> None:
    """Write the self-contained HTML report of a run."""
    from pairtrace.cli.common import check_out_file
    from pairtrace.report import write_report

    check_out_file(out)
    path = write_report(run_dir, out)
    console.print(f"[green]wrote[/] {path}")


@command(
    "intervene",
    epilog=(
        "Examples:\n\n  pairtrace intervene runs/organism/organism/data/preference_mix.jsonl "
        "--ranking runs/organism/rankings/probe --action switch --k 96 --out runs/switch-probe-96\n\n"
        "  pairtrace intervene mix.jsonl --selection random --action filter --k 96 --seed 1 --out runs/random-96\n\n"
        "  pairtrace intervene mix.jsonl --selection source --models fjord-34b --out runs/no-fjord"
    ),
)
def intervene(
    pairs: str = typer.Argument(None, help="The dataset the ranking was computed on: file, saved dataset or hub id."),
    pairs_flag: str = typer.Option(None, "--pairs", help="The dataset, as a flag (instead of PAIRS)."),
    ranking: Path = typer.Option(None, help="Ranking directory from `pairtrace attribute` (selection 'ranking')."),
    action: str = typer.Option("filter", help="filter (drop the selected pairs) | switch (swap chosen/rejected)."),
    selection: str = typer.Option("ranking", help="ranking (top-k) | random (seeded k) | source (chosen models)."),
    k: int = typer.Option(None, "--k", help="How many pairs (ranking and random selections)."),
    seed: int = typer.Option(0, help="Seed of the random selection."),
    models: list[str] = typer.Option(None, "--models", help="chosen_model values to ablate (selection 'source')."),
    split: str = typer.Option(None, help="Split of a saved / hub dataset."),
    data_revision: str = typer.Option(None, help="Hub revision of the dataset."),
    open_instruct: bool = typer.Option(True, help="Also write the result for open-instruct (open_instruct/)."),
    out: Path = out_option(help="Output directory."),
    config: Path = ConfigOpt,
) -> None:
    """Write the dataset with the top-k (or random-k, or some sources' pairs) filtered or switched, by stable id."""
    from pairtrace.cli.common import check_out_dir, pick_input

    pairs = pick_input(pairs, pairs_flag, "pairs")
    require(locals(), "pairs", "out")
    check_out_dir(out)
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


@command(
    "retrain", model=MODEL_NAME, recipe=RECIPE, engine=RETRAIN_ENGINE,
    epilog=(
        "Examples:\n\n  pairtrace retrain runs/switch-probe-96/preference_mix.jsonl --model runs/organism/organism/m0 "
        "--learning-rate 8e-4 --lr-scheduler-type constant --sft-weight 0.75 --out runs/retrain-switch-probe-96\n\n"
        "  pairtrace retrain --model m0/ --pairs mix.jsonl --engine accelerate --num-processes 8 "
        "--accelerate-config zero3.yaml --gradient-checkpointing --out runs/retrain\n\n"
        "  pairtrace retrain --config configs/retrain.yaml   # keys = option names, section 'retrain' or top level"
    ),
)
def retrain(
    pairs: str = typer.Argument(None, help="Preference pairs: file, saved dataset or hub id (any supported layout)."),
    pairs_flag: str = typer.Option(None, "--pairs", help="The pairs, as a flag (instead of PAIRS)."),
    split: str = typer.Option(None, help="Split of a saved / hub dataset."),
    out: Path = out_option(help="Output directory (model/, dpo_summary.json)."),
    ref_cache: Path = typer.Option(None, help="Folder caching M0's reference log-probs across retrains."),
    model: ModelSpec = None,
    recipe: DPORecipe = None,
    engine: RetrainEngineOptions = None,
    config: Path = ConfigOpt,
) -> None:
    """DPO from M0 (--model: the starting checkpoint and frozen reference) with one recipe (the baseline and every
    intervention use the same), on a retrain engine: TRL's DPOTrainer in this process or under accelerate launch,
    or your own command."""
    from pairtrace.cli.common import check_cli_model, check_out_dir, load_cli_pairs, pick_input

    pairs = pick_input(pairs, pairs_flag, "pairs")
    require(locals(), "pairs", "out")
    check_out_dir(out)
    from pairtrace.data.pairs import pair_to_record
    from pairtrace.errors import ConfigError
    from pairtrace.records import write_jsonl_atomic
    from pairtrace.retrain.engines import RETRAINERS, RetrainRequest, get_retrainer

    if engine.engine not in RETRAINERS:
        raise ConfigError(f"--engine: {engine.engine!r} is not one of {sorted(RETRAINERS)}")
    check_cli_model(model)
    pair_set = load_cli_pairs(pairs, "train on", split=split)
    out_dir = Path(out)
    train_file = write_jsonl_atomic(
        [pair_to_record(p, "conversational") for p in pair_set], out_dir / "train.jsonl",
    )  # any input layout, as the prompt + assistant-turn messages the trainer reads
    request = RetrainRequest(m0=model, train_file=train_file, model_dir=out_dir / "model", recipe=recipe,
                             ref_cache_dir=ref_cache, options=engine)
    summary = get_retrainer(engine.engine)(request)
    loss = "?" if summary.train_loss is None else f"{summary.train_loss:.4f}"
    console.print(f"[green]wrote[/] {out_dir / 'model'} ({summary.engine}): {summary.n_pairs} pairs, "
                  f"{summary.steps if summary.steps is not None else '?'} steps, loss {loss}, "
                  f"{summary.seconds or 0:.0f} s")


organism_app = typer.Typer(help="The built-in model organism (M0 -> DPO on a contaminated mix -> M1).",
                           no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@command(
    "build", on=organism_app, options=False,
    epilog=(
        "Examples:\n\n"
        "  pairtrace organism build --out runs/org\n\n"
        "  pairtrace organism build --out runs/org-small --config configs/organism-small.yaml"
    ),
)
def organism_build(
    out: Path = out_option(..., help="Output directory (finished steps are reused)."),
    config: Path = typer.Option(Path("configs/organism.yaml"), "--config", "-c",
                                help="Organism config, or a run config with an `organism:` section."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Build tokenizer, M0 (SFT), the preference mix with its planted behaviours, and M1 (DPO); print the checks."""
    from pairtrace.cli.common import check_out_dir
    from pairtrace.organism.build import run_build

    check_out_dir(out)
    raw = load_yaml(config)
    if isinstance(raw.get("organism"), str):  # a run config naming the organism's config file
        config = config.parent / raw["organism"]
    elif isinstance(raw.get("organism"), dict):  # a run config with the organism inline
        import yaml

        from pairtrace.records import write_text_atomic

        config = write_text_atomic(yaml.safe_dump(raw["organism"], sort_keys=False), out / "organism-config.yaml")
    run_build(config, out, progress=progress)
