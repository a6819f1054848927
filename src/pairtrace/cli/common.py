"""What the commands share: the typer app, the option groups, errors as one line, required options, logging."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.generate import GenerationConfig
from pairtrace.judges.factory import JudgeOptions
from pairtrace.model_spec import ModelSpec
from pairtrace.options import OptionGroup, cli_options
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


def command(name: str, *, epilog: str, on: typer.Typer = app, options: bool = True,
            **groups: OptionGroup) -> Callable[[Callable], Callable]:
    """Register a function as the command ``name`` of ``on``, with user errors printed as one line.

    Args:
        name: The command's name.
        epilog: Its examples, shown by ``--help``.
        on: The typer app it belongs to.
        options: Whether :func:`pairtrace.options.cli_options` builds its option groups and reads its ``--config``
            (section ``name``).
        **groups: Parameter name -> the option group it receives.
    """

    def decorate(func: Callable) -> Callable:
        if options:
            func = cli_options(name, **groups)(func)
        return on.command(name, epilog=epilog)(friendly_errors(func))

    return decorate


def out_option(default: Any = None, *, help: str) -> Any:
    """The ``--out``/``-o`` option of a command."""
    return typer.Option(default, "--out", "-o", help=help)


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
