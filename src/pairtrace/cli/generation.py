"""Commands that sample and judge: generate, judge, evaluate, triples, and the OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path

import typer

from pairtrace.cli.common import (
    JUDGE,
    MODEL,
    SAMPLING,
    ConfigOpt,
    app,
    check_out_file,
    command,
    out_option,
    require,
    say,
    warn,
)
from pairtrace.generate import GenerationConfig
from pairtrace.judges.factory import JudgeOptions
from pairtrace.model_spec import ModelSpec


@command(
    "generate", model=MODEL, sampling=SAMPLING,
    epilog=(
        "Examples:\n\n"
        "  pairtrace generate --model runs/organism/organism/m1 --prompts prompts.jsonl --out gens.jsonl\n\n"
        "  pairtrace generate --model m0/ --prompts prompts.jsonl --samples 4 --temperature 0.7 --seed 1 --out g.jsonl"
    ),
)
def generate(
    prompts: Path = typer.Option(None, help="Prompt records (JSONL: id, base_id, set, condition, prompt, ...)."),
    out: Path = out_option(help="Generation JSONL (resumed when it exists)."),
    model_name: str = typer.Option(None, help="Value of the records' `model` field (default: the directory name)."),
    model: ModelSpec = None,
    sampling: GenerationConfig = None,
    config: Path = ConfigOpt,
) -> None:
    """Sample responses with the chat template applied (batched, seeded, resumable)."""
    require(locals(), "prompts", "out")
    check_out_file(out)
    from pairtrace.cli.common import check_cli_model
    from pairtrace.generate import run_generate

    check_cli_model(model)
    stats = run_generate(model, prompts, out, sampling, model_name=model_name)  # the whole spec: vLLM reads it
    say(f"{out}: {stats.get('n_new')} new, {stats.get('n_existing')} kept", ok="wrote")


@command(
    "judge", judge_options=JUDGE,
    epilog=(
        "Examples:\n\n"
        "  pairtrace judge gens.jsonl --out judgements.jsonl\n\n"
        "  pairtrace judge gens.jsonl --judge openai --judge-url http://localhost:8000/v1 --judge-model gpt-x "
        "--out judgements.jsonl"
    ),
)
def judge(
    generations: Path = typer.Argument(None, help="Generation JSONL."),
    out: Path = out_option(help="Judgement JSONL (appended; resumed when it exists)."),
    retry_unknown: bool = typer.Option(False, help="Judge again the records that ended unknown last time."),
    judge_options: JudgeOptions = None,
    config: Path = ConfigOpt,
) -> None:
    """Judge generations (harmful / safe / unknown), resumably. A failure is never counted as safe."""
    require(locals(), "generations", "out")
    check_out_file(out)
    from pairtrace.judges.factory import build_judge
    from pairtrace.judges.judging import run_judge_generations

    stats = run_judge_generations(generations, build_judge(judge_options), out, retry_unknown=retry_unknown)
    say(f"into {out}: {stats}", ok="judged")
    check_unknown_verdicts(stats["judged"], stats["unknown"], (stats.get("counters") or {}).get("failures"), out)


def check_unknown_verdicts(n_judged: int, n_unknown: int, failures: dict | None, kept: Path) -> None:
    """Warn about unknown verdicts; fail (exit 2) when every verdict of this run is unknown.

    Raises:
        JudgeEndpointError: Every verdict is unknown (the judgements are kept for ``--retry-unknown``).
    """
    if not n_unknown:
        return
    why = f" (failures: {', '.join(f'{k} x{v}' for k, v in failures.items())})" if failures else ""
    advice = ("check the endpoint (--judge-url, --judge-model, the key in --judge-key-env), then rerun with "
              "--retry-unknown")
    if n_unknown >= n_judged:
        from pairtrace.judges.openai import JudgeEndpointError

        raise JudgeEndpointError(f"every one of the {n_judged} verdict(s) is unknown{why}; they are kept in {kept}: "
                                 f"{advice}")
    warn(f"{n_unknown} of {n_judged} verdict(s) are unknown{why}; unknowns are never counted as safe: {advice}")


@command(
    "evaluate", judge_options=JUDGE,
    epilog=(
        "Examples:\n\n"
        "  pairtrace evaluate gens.jsonl --out eval.json\n\n"
        "  pairtrace evaluate gens.jsonl --judgements judgements.jsonl --out eval.json"
    ),
)
def evaluate(
    generations: Path = typer.Argument(None, help="Generation JSONL (one or both models)."),
    out: Path = out_option(help="Evaluation JSON."),
    judgements: Path = typer.Option(None, help="Judgement JSONL (default: <out>.judgements.jsonl, resumed)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    retry_unknown: bool = typer.Option(False, help="Judge again the records that ended unknown last time."),
    judge_options: JudgeOptions = None,
    config: Path = ConfigOpt,
) -> None:
    """Harmful rate per set and condition with 95% intervals, benign helpfulness and over-refusal."""
    require(locals(), "generations", "out")
    check_out_file(out)
    check_out_file(judgements, "--judgements")
    from pairtrace.evaluate import print_evaluation, run_evaluate
    from pairtrace.judges.factory import build_judge

    def check_verdicts(result: dict) -> None:
        rows = result["harmful"]
        judging = result.get("judging") or {}
        check_unknown_verdicts(sum(r["judged"] + r["unknown"] for r in rows), sum(r["unknown"] for r in rows),
                               (judging.get("counters") or {}).get("failures"), Path(result["paths"]["judgements"]))

    result = run_evaluate(generations, build_judge(judge_options), out, judgements_path=judgements, n_boot=n_boot,
                          seed=seed, retry_unknown=retry_unknown, check=check_verdicts)
    print_evaluation(result)
    say(f"{out}", ok="wrote")


@command("triples", epilog="Example:\n\n  pairtrace triples gens.jsonl judgements.jsonl --out triples.jsonl")
def triples(
    generations: Path = typer.Argument(None, help="Generation JSONL with M1 and M0 records over linked prompts."),
    judgements: Path = typer.Argument(None, help="Judgement JSONL for those generations."),
    out: Path = out_option(help="Triple JSONL (stats beside it)."),
    m1: str = typer.Option("m1", help="Model name of M1 in the generation records."),
    m0: str = typer.Option("m0", help="Model name of M0 in the generation records."),
    unknown: str = typer.Option("exclude", help="exclude (drop prompts with unknown verdicts) | ignore."),
    config: Path = ConfigOpt,
) -> None:
    """Build (prompt, r1, r0) triples with the paper's 4-condition filter."""
    require(locals(), "generations", "judgements", "out")
    check_out_file(out)
    from pairtrace.triples import run_build_triples

    stats = run_build_triples(generations, judgements, out, m1=m1, m0=m0,
                              unknown=unknown)
    say(f"{out}: {stats.get('triples', 0)} triple(s) from {stats.get('triple_prompts', 0)} prompt(s)", ok="wrote")
    if not stats.get("triples"):
        warn(f"no triple passed the filter: check that {generations} holds --m1 {m1!r} and --m0 {m0!r} records over "
             f"the same prompts, judged in {judgements}")


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
