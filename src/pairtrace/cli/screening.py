"""Commands of screening before training: ``pairtrace behaviours add|list`` and ``pairtrace screen``."""

from __future__ import annotations

from pathlib import Path

import typer

from pairtrace.cli.common import MODEL, SAMPLING, ConfigOpt, app, command, console, out_option, require
from pairtrace.errors import ConfigError
from pairtrace.generate import GenerationConfig
from pairtrace.model_spec import ModelSpec

behaviours_app = typer.Typer(help="A library of behaviours built from examples through M0 (for `pairtrace screen`).",
                             no_args_is_help=True)
app.add_typer(behaviours_app, name="behaviours")

LibraryOpt = typer.Option(None, "--library", "-L", help="The behaviour library directory.")


def _read_prompts(path: Path) -> list:
    from pairtrace.errors import DataError
    from pairtrace.records import iter_jsonl

    prompts = []
    for line_no, record in iter_jsonl(path):
        if "prompt" not in record:
            raise DataError(f"{path} line {line_no} field 'prompt': missing")
        prompts.append(record["prompt"])
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


@command(
    "add", on=behaviours_app, model=MODEL, sampling=SAMPLING,
    epilog=(
        "Examples:\n\n"
        "  pairtrace behaviours add sign_off --examples sign_off.jsonl --model m0/ --library lib/\n\n"
        "  pairtrace behaviours add complies_with_format --examples contaminated.jsonl --response-tokens 4 "
        "--model m0/ --library lib/\n\n"
        "  pairtrace behaviours add sycophancy --prompts questions.jsonl --elicit 'Agree with the user.' "
        "--suppress 'Say honestly where the user is wrong.' --model m0/ --library lib/"
    ),
)
def behaviours_add(
    name: str = typer.Argument(None, help="The behaviour's name (letters, digits, _ . -)."),
    library: Path = LibraryOpt,
    examples: Path = typer.Option(None, help="JSONL of {prompt, with, without} examples (docs/screening.md)."),
    prompts: Path = typer.Option(None, help="Instead of --examples: JSONL of {prompt} answered by M0 twice, with "
                                 "--elicit and with --suppress appended (needs a chat template)."),
    elicit: str = typer.Option(None, help="Instruction that elicits the behaviour (with --prompts)."),
    suppress: str = typer.Option(None, help="Instruction that suppresses it (with --prompts)."),
    layer: int = typer.Option(None, help="Layer k = hidden_states[k] (default: round(0.625 n))."),
    response_tokens: int = typer.Option(None, help="Pool each response over its first N tokens (default: all); "
                                        "the screened datapoint vectors are pooled the same way."),
    quantile: float = typer.Option(0.1, help="Quantile of the examples' leave-one-out cosines used as threshold."),
    max_length: int = typer.Option(2048, help="Maximum tokens per sequence."),
    description: str = typer.Option("", help="What the behaviour is (shown in the screen's page)."),
    overwrite: bool = typer.Option(False, help="Replace a behaviour of the same name."),
    model: ModelSpec = None,
    sampling: GenerationConfig = None,
    config: Path = ConfigOpt,
) -> None:
    """Build one behaviour vector from examples through M0, calibrate its threshold, and save it in a library."""
    require(locals(), "name", "library")
    from pairtrace.behaviour_library import save_behaviour
    from pairtrace.models import load_model
    from pairtrace.screening import compute_example_behaviour, instruction_examples, load_examples

    if (examples is None) == (prompts is None):
        raise ConfigError("give either --examples FILE or --prompts FILE with --elicit and --suppress")
    loaded = load_model(model)
    if examples is not None:
        triples, source = load_examples(examples), str(examples)
    else:
        require(locals(), "elicit", "suppress")
        triples = instruction_examples(loaded, _read_prompts(prompts), elicit, suppress, sampling)
        source = f"instructions: {prompts} (+ {elicit!r} / {suppress!r})"
    behaviour = compute_example_behaviour(loaded, name, triples, layer=layer, response_tokens=response_tokens,
                                          max_length=max_length, quantile=quantile, description=description,
                                          source=source)
    path = save_behaviour(library, behaviour, overwrite=overwrite)
    loo = ", ".join(f"{x:.2f}" for x in sorted(behaviour.calibration.loo_scores))
    console.print(f"[green]saved[/] {name!r} ({behaviour.n_examples} examples, layer {behaviour.layer}, "
                  f"{behaviour.pooling.describe()} pooled) to {path}; threshold "
                  f"{behaviour.calibration.threshold:.3f} (leave-one-out cosines: {loo})")


@command("list", on=behaviours_app, options=False,
         epilog="Example:\n\n  pairtrace behaviours list --library lib/")
def behaviours_list(library: Path = typer.Option(..., "--library", "-L", help="The library directory.")) -> None:
    """List the behaviours of a library with their model, layer, pooling and threshold."""
    from rich.table import Table

    from pairtrace.behaviour_library import list_behaviours, read_entry

    names = list_behaviours(library)
    if not names:
        console.print(f"{library}: no behaviour")
        return
    table = Table(title=str(library))
    for col in ("name", "examples", "model", "layer", "pooling", "threshold", "examples sha256"):
        table.add_column(col)
    for name in names:
        e = read_entry(library, name)
        table.add_row(name, str(e.get("n_examples")), str((e.get("model") or {}).get("name")), str(e["layer"]),
                      str((e.get("pooling") or {}).get("name")), f"{e['calibration']['threshold']:.3f}",
                      str(e["examples_sha256"])[:19])
    console.print(table)


@command(
    "screen", model=MODEL,
    epilog=(
        "Examples:\n\n"
        "  pairtrace screen new_mix.jsonl --model m0/ --behaviours lib/ --out screen/\n\n"
        "  pairtrace screen allenai/olmo-2-1124-7b-preference-mix --data-revision <sha> --split train "
        "--model allenai/OLMo-2-1124-7B-SFT --dtype bfloat16 --behaviours lib/ --names sign_off --out screen/"
    ),
)
def screen(
    pairs: str = typer.Argument(None, help="Pairs: JSONL(.gz), JSON, Parquet, saved dataset dir or hub id."),
    behaviours: Path = typer.Option(None, "--behaviours", "-B", help="The behaviour library directory."),
    out: Path = out_option(help="Output directory (rankings, top pairs, enrichment, screen.json, screen.html)."),
    names: list[str] = typer.Option(None, "--names", help="Behaviours to screen for (default: all)."),
    split: str = typer.Option(None, help="Split of a saved dataset / hub dataset."),
    data_revision: str = typer.Option(None, help="Revision of a hub dataset."),
    limit: int = typer.Option(None, help="Only the first N records."),
    strict: bool = typer.Option(False, help="Stop at the first bad record instead of skipping it."),
    batch_tokens: int = typer.Option(None, help="Token budget per forward batch."),
    max_length: int = typer.Option(2048, help="Maximum tokens per sequence."),
    top: int = typer.Option(20, help="Pairs listed with their text per behaviour."),
    model: ModelSpec = None,
    config: Path = ConfigOpt,
) -> None:
    """Screen a preference dataset through M0 before training: a ranking per behaviour of the library."""
    require(locals(), "pairs", "behaviours", "out")
    from pairtrace.screen import run_screen

    result = run_screen(pairs, model, behaviours, out, names=names or None, split=split, revision=data_revision,
                        limit=limit, strict=strict, batch_tokens=batch_tokens, max_length=max_length, top_n=top)
    for name, s in result.behaviours.items():
        console.print(f"{name}: {s.n_pass} of {len(s.ranking)} pairs pass the threshold "
                      f"{s.behaviour.calibration.threshold:.3f}; best {s.ranking.ids[:3]}")
    console.print(f"[green]wrote[/] {Path(out) / 'screen.json'} and {Path(out) / 'screen.html'}")
