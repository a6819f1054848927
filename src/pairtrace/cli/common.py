"""What the commands share: the typer app, the option groups, errors as one line, required options, logging."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

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
            error(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:  # a file the user named cannot be read or written (exists, is a folder, no access)
            error(describe_os_error(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: finished shards and records are kept; rerun to resume[/]")
            raise typer.Exit(130) from None

    return wrapper


def error(message: str) -> None:
    """Print ``error: <message>`` on stderr, the message as plain text (``[k]`` or ``<sha>`` kept as typed)."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr, the message as plain text."""
    console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def say(message: str, *, ok: str | None = None) -> None:
    """Print a plain-text line on stderr, optionally led by a green word (``wrote``, ``done:``)."""
    lead = f"[green]{ok}[/] " if ok else ""
    console.print(f"{lead}{escape(message)}", soft_wrap=True, highlight=False)


def describe_os_error(exc: OSError) -> str:
    """``<file>: <reason>`` for an operating-system error about a file (the file as the user named it)."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    target = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return f"{exc.filename}{target}: {reason}"


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
        return on.command(name, epilog=as_typed(epilog))(friendly_errors(func))

    return decorate


def as_typed(text: str) -> str:
    """Help text that ``--help`` shows as written: ``<sha>`` and ``[k]`` escaped from the markdown renderer."""
    return text.replace("\\", "\\\\").replace("<", "\\<").replace("[", "\\[")


def out_option(default: Any = None, *, help: str) -> Any:
    """The ``--out``/``-o`` option of a command."""
    return typer.Option(default, "--out", "-o", help=help)


def threads_option() -> Any:
    """The ``--threads`` option: CPU threads for torch (instead of setting ``OMP_NUM_THREADS``)."""
    return typer.Option(None, "--threads", min=1,
                        help="CPU threads for the model (default: torch's choice, or OMP_NUM_THREADS).")


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's operations (nothing when None)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def check_out_dir(out: Any, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file (before any work is done).

    Raises:
        ConfigError: Naming the flag and the file.
    """
    if out is None:
        return
    from pathlib import Path

    path = Path(out)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "" if parent == path else f" (its parent {parent} is a file)"
            raise ConfigError(f"{flag} {out}: is an existing file{where}; give a folder")


def check_out_file(out: Any, flag: str = "--out") -> None:
    """Refuse an output file that is an existing folder, or whose parent is a file.

    Raises:
        ConfigError: Naming the flag and the path.
    """
    if out is None:
        return
    from pathlib import Path

    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{flag} {out}: is a folder; give a file name")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {out}: its parent {parent} is a file, not a folder")


def load_cli_model(spec: ModelSpec, flag: str = "--model") -> Any:
    """Load the model a command's ``flag`` names (:func:`pairtrace.models.load_model`), errors led by the flag.

    Raises:
        ConfigError: ``--model: model folder 'runs/m0' does not exist ...``.
    """
    from pairtrace.models import load_model

    try:
        return load_model(spec)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def check_cli_model(spec: ModelSpec, flag: str = "--model") -> None:
    """Check, without loading it, that the model ``flag`` names can be loaded: a whole local model folder, or a
    name shaped like a hub id (for commands that hand the model to another engine: retrain, vLLM).

    Raises:
        ConfigError: ``--model: model folder 'runs/m0' does not exist ...`` (or what the folder lacks).
    """
    from pathlib import Path

    from pairtrace.models import check_hub_id, check_model_folder

    local = Path(spec.name_or_path).expanduser()
    try:
        if local.is_dir():
            check_model_folder(local, spec.name_or_path)
        else:
            check_hub_id(spec.name_or_path, local)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def load_cli_pairs(pairs: str, purpose: str, **kwargs: Any) -> Any:
    """Load a pair file for a command, refuse it when no pair is left, and say what was read.

    Args:
        pairs: File, folder or hub id (:func:`pairtrace.data.pairs.load_pairs`).
        purpose: What the pairs are for, in the error message ("train on", "extract").
        **kwargs: Passed to ``load_pairs`` (``split``, ``revision``, ``strict``, ``limit``).

    Raises:
        DataError: Every record is bad, or there is none.
    """
    from pairtrace.data.pairs import load_pairs
    from pairtrace.errors import DataError

    pair_set = load_pairs(pairs, **kwargs)
    if not len(pair_set):
        what = (f"all {pair_set.n_records} record(s) are bad (listed above)" if pair_set.n_records
                else "it holds no records")
        raise DataError(f"{pairs}: no pairs to {purpose}: {what}")
    say(f"read {len(pair_set)} pairs from {pair_set.origin} ({pair_set.format}); "
        f"skipped {len(pair_set.skipped)} bad record(s)")
    return pair_set


def pick_input(positional: str | None, flag_value: str | None, name: str) -> str | None:
    """One input given either as the positional ``NAME`` or as ``--name`` (never two different ones).

    Raises:
        ConfigError: Both were given and differ.
    """
    if positional is not None and flag_value is not None and str(positional) != str(flag_value):
        raise ConfigError(f"{name.upper()} and --{name} name different inputs ({positional} and {flag_value}); "
                          "give one")
    return positional if positional is not None else flag_value


def current_context() -> Any:
    """The running command's context (typer ships its own copy of click in recent versions), or None."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # typer on top of the click package
        get_current_context = click.get_current_context
    return get_current_context(silent=True)


def param_name(name: str) -> str:
    """How the user types the parameter ``name`` of the current command: ``--vectors`` for an option (its first
    flag), ``PAIRS`` for a positional argument."""
    ctx = current_context()
    params = getattr(getattr(ctx, "command", None), "params", [])
    for param in params:
        if param.name == name:
            if not any(o.startswith("-") for o in param.opts):  # a positional argument
                flag = "--" + name.replace("_", "-")
                also = any(flag in getattr(other, "opts", ()) for other in params if other is not param)
                return f"{name.upper()} (or {flag})" if also else name.upper()
            longs = [o for o in param.opts if o.startswith("--")]
            return (longs or param.opts)[0]
    return "--" + name.replace("_", "-")


def require(options: dict[str, Any], *names: str) -> None:
    """Fail clearly when required options were given neither as flags nor in the config.

    Args:
        options: The command's option values (its ``locals()``).
        *names: The parameter names that must be set.
    """
    missing = [n for n in names if options.get(n) in (None, [], "")]
    if missing:
        flags = ", ".join(param_name(n) for n in missing)
        raise ConfigError(f"missing required option(s): {flags} (give them on the command line or in --config)")


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
