"""Options dataclasses as YAML keys and command-line flags: each option is defined once, as a dataclass field.

An options dataclass declares every option as a field with a default and ``metadata={"help": ...}``. The same
dataclass is then read from a YAML mapping (:func:`from_mapping`: keys = field names, unknown keys refused with
the section named) and added to a typer command (:func:`cli_options`: one ``--flag`` per field, help and default
from the field; the command receives the built instance), in the spirit of transformers' ``HfArgumentParser``.
Messages about a value name the key or flag the user typed (:class:`OptionError`).

YAML files are read as data (never executed); on the command line, ``--config FILE.yaml`` fills the options not
given as flags (flags win).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from pairtrace.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (no object construction, no code).

    Raises:
        ConfigError: When the file is missing, unparsable or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of option names to values")
    return dict(data)


def section(config: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """The sub-mapping ``config[name]`` (or the whole config when ``name`` is None or absent)."""
    if name is None or name not in config:
        return dict(config)
    sub = config[name]
    if not isinstance(sub, Mapping):
        raise ConfigError(f"config section '{name}' must be a mapping")
    return dict(sub)


def merge_options(flags: Mapping[str, Any], given: set[str], config: Mapping[str, Any],
                  allowed: set[str]) -> dict[str, Any]:
    """Merge config-file values under command-line flags.

    Args:
        flags: Every option's value as the command received it (defaults included).
        given: Names of the options the user actually passed on the command line.
        config: Values read from the YAML file (keys may use ``-`` or ``_``).
        allowed: Option names the command accepts.

    Returns:
        ``flags`` with each option the user did not pass replaced by the config value, if any.

    Raises:
        ConfigError: On config keys the command does not know.
    """
    normalised = {str(k).replace("-", "_"): v for k, v in config.items()}
    unknown = sorted(set(normalised) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) in config: {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    merged = dict(flags)
    for key, value in normalised.items():
        if key not in given:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------------
# Errors worded with the user's names
# --------------------------------------------------------------------------------------------------


class OptionError(ConfigError):
    """An invalid option value, worded with the name the user typed for each field involved.

    The message is a template with one ``{field}`` placeholder per field; :meth:`named` fills them with flags
    (``--judge-url``) or YAML keys (``judge.base_url``). Raised from an options dataclass's ``__post_init__``.

    Args:
        template: The message, e.g. ``"the openai judge needs {base_url} and {model}"``.
        *fields: The field names the template's placeholders refer to.
    """

    def __init__(self, template: str, *fields: str) -> None:
        self.template = template
        self.fields = fields
        super().__init__(self._format(str))

    def _format(self, name_of: Callable[[str], str]) -> str:
        return self.template.format(**{f: name_of(f) for f in self.fields})

    def named(self, name_of: Callable[[str], str]) -> ConfigError:
        """The same error with each field called by ``name_of(field)``."""
        return ConfigError(self._format(name_of))


def build_instance(cls: type, kwargs: Mapping[str, Any], name_of: Callable[[str], str], where: str) -> Any:
    """``cls(**kwargs)`` with errors that name the user's keys or flags.

    Raises:
        ConfigError: A required field is missing, a value is invalid (:class:`OptionError`) or of a wrong kind.
    """
    missing = [f.name for f in dataclasses.fields(cls) if is_required(f) and kwargs.get(f.name) is None]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(name_of(m) for m in missing)}")
    try:
        return cls(**kwargs)
    except OptionError as exc:
        raise exc.named(name_of) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Dataclass fields
# --------------------------------------------------------------------------------------------------


def is_required(f: dataclasses.Field) -> bool:
    """Whether a field has no default."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for ``default_factory``; None when required)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def field_help(f: dataclasses.Field) -> str:
    """A field's help text (``metadata["help"]``)."""
    return str(f.metadata.get("help", ""))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a dataclass (annotations may be strings)."""
    return typing.get_type_hints(cls)


def dataclass_of(annotation: Any) -> type | None:
    """The dataclass an annotation names (``X`` or ``X | None``), else None."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return dataclass_of(inner[0])
    return None


# --------------------------------------------------------------------------------------------------
# YAML mappings
# --------------------------------------------------------------------------------------------------


def from_mapping(cls: type, raw: Any, key: str, context: str = "config") -> Any:
    """Build an options dataclass from a YAML mapping (keys = field names), recursing into dataclass fields.

    Args:
        cls: The options dataclass.
        raw: The parsed mapping; None means every default; an instance of ``cls`` is returned as is.
        key: The mapping's key path in the file (``"validation.recipe"``); its keys are named ``<key>.<field>``.
        context: What the file is, for messages (``"run config"``).

    Raises:
        ConfigError: ``raw`` is not a mapping, has unknown keys (named with the known ones), misses a required
            field or holds an invalid value.
    """
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    where = f"{context}: {key}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        annotation = field_types(cls)[name]
        nested = dataclass_of(annotation)
        if nested is not None and (value is not None or not is_optional(annotation)):
            value = from_mapping(nested, value, f"{key}.{name}", context)
        kwargs[name] = coerce_number(value, annotation, f"{key}.{name}")
    return build_instance(cls, kwargs, lambda f: f"{key}.{f}", where)


def number_type(annotation: Any) -> type | None:
    """``float`` or ``int`` when an annotation is that number type (``X`` or ``X | None``), else None."""
    if annotation in (float, int):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and inner[0] in (float, int):
            return inner[0]
    return None


def coerce_number(value: Any, annotation: Any, name: str) -> Any:
    """A config value for a number field, read as that number.

    PyYAML follows YAML 1.1, where ``1e-6`` (no dot) is a string, not a float: such strings are read as the number
    they spell. Numbers are returned unchanged (an int stays an int in a float field, so hashes of existing configs
    do not move); other values of a number field are refused.

    Args:
        value: The parsed value.
        annotation: The field's type.
        name: The key or flag the user typed (``validation.recipe.learning_rate``), for the message.

    Raises:
        ConfigError: The value is not a number of the field's kind (a bool, a word, a fraction for an integer).
    """
    kind = number_type(annotation)
    if kind is None or value is None:
        return value
    wanted = "a number" if kind is float else "an integer"
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected {wanted}, got {value!r}")
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{name}: expected {wanted}, got {value!r}")


def is_optional(annotation: Any) -> bool:
    """Whether an annotation admits None."""
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)


# --------------------------------------------------------------------------------------------------
# Command-line options
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionGroup:
    """How an options dataclass appears on a command line.

    Attributes:
        cls: The options dataclass (each field: a default and ``metadata={"help": ...}``).
        prefix: Prepended to each field's flag name (``"judge-"`` gives ``--judge-backoff-s``).
        names: Flag names (without ``--``) of some fields, instead of prefix + field name.
        short: Short flags of some fields (``{"name_or_path": "-m"}``).
        hidden_aliases: Older flag names (without ``--``) still accepted for some fields, not shown in help.
        exclude: Fields that are not options (they keep their defaults).
        lead: Fields listed first in ``--help`` (the others follow in declaration order).
        panel: Title of the group's panel in ``--help``.
    """

    cls: type
    prefix: str = ""
    names: Mapping[str, str] = field(default_factory=dict)
    short: Mapping[str, str] = field(default_factory=dict)
    hidden_aliases: Mapping[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    lead: tuple[str, ...] = ()
    panel: str | None = None

    def fields(self) -> list[dataclasses.Field]:
        """The fields that are options: ``lead`` first, then declaration order."""
        fields = [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]
        return sorted(fields, key=lambda f: self.lead.index(f.name) if f.name in self.lead else len(self.lead))

    def flag(self, name: str) -> str:
        """The flag of a field, e.g. ``--judge-url``."""
        return "--" + self.names.get(name, self.prefix + name.replace("_", "-"))

    def param(self, name: str) -> str:
        """The parameter name (and ``--config`` key) of a field's option, e.g. ``judge_url``."""
        return self.flag(name)[2:].replace("-", "_")

    def parameters(self) -> list[inspect.Parameter]:
        """One keyword parameter with a ``typer.Option`` default per field, then the hidden aliases."""
        hints = field_types(self.cls)
        params = []
        for f in self.fields():
            annotation = hints[f.name] if not is_required(f) else hints[f.name] | None
            decls = [self.flag(f.name), *([self.short[f.name]] if f.name in self.short else [])]
            option = typer.Option(field_default(f), *decls, help=field_help(f), rich_help_panel=self.panel,
                                  show_default=not is_required(f))
            params.append(inspect.Parameter(self.param(f.name), inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
        for name, alias in self.hidden_aliases.items():
            option = typer.Option(None, "--" + alias, hidden=True)
            params.append(inspect.Parameter(alias.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=hints[name] | None))
        return params

    def build(self, values: Mapping[str, Any], given: set[str]) -> Any:
        """The dataclass instance from a command's option values (hidden aliases folded in).

        Args:
            values: Every option value of the command, by parameter name (config values merged in).
            given: Parameter names the user passed on the command line.
        """
        kwargs = {f.name: values[self.param(f.name)] for f in self.fields()}
        for name, alias in self.hidden_aliases.items():
            alias_value = values.get(alias.replace("-", "_"))
            if alias_value is not None and self.param(name) not in given:
                kwargs[name] = alias_value
        return build_instance(self.cls, kwargs, self.flag, self.cls.__name__)


CONTEXT = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)


def cli_options(config_section: str | None = None, **groups: OptionGroup) -> Callable[[Callable], Callable]:
    """Decorate a typer command: add each group's fields as options; the command receives built instances.

    The decorated function declares one parameter per group (its name is a keyword of ``groups``) and its other
    options as usual. The command typer sees has the other options, then every group field as a ``--flag``
    (typed, with the field's default and help), so each option is defined once, in its dataclass. When the
    function has a ``config`` parameter, ``--config FILE.yaml`` fills the options not given as flags (keys =
    parameter names, e.g. ``judge_url``; the sub-mapping ``config_section`` when the file has one).

    Example::

        @app.command()
        @cli_options("generate", sampling=OptionGroup(GenerationConfig))
        def generate(prompts: Path = typer.Option(...), sampling: GenerationConfig = None) -> None: ...

    Args:
        config_section: Section of the ``--config`` file read by this command.
        **groups: Parameter name -> the options dataclass it receives.

    Raises:
        ValueError: Two options share a name.
    """

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        wants_ctx = "ctx" in signature.parameters
        own = [p for name, p in signature.parameters.items() if name not in groups and name != "ctx"]
        added = [p for group in groups.values() for p in group.parameters()]
        params = [CONTEXT, *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own], *added]
        names = [p.name for p in params]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ValueError(f"{func.__name__}: option names used twice: {clashes}")

        @functools.wraps(func)
        def wrapper(ctx: typer.Context, **values: Any) -> Any:
            given = given_on_command_line(ctx, values)
            if "config" in values:
                values = merge_config_file(ctx, values, given, config_section)
            kwargs = {p.name: values[p.name] for p in own}
            kwargs.update({name: group.build(values, given) for name, group in groups.items()})
            return func(ctx, **kwargs) if wants_ctx else func(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def given_on_command_line(ctx: typer.Context, values: Mapping[str, Any]) -> set[str]:
    """Parameter names whose value came from the command line (or the environment), not from a default."""
    return {name for name in values
            if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


def merge_config_file(ctx: typer.Context, values: dict[str, Any], given: set[str],
                      config_section: str | None) -> dict[str, Any]:
    """Fill the options not given as flags from ``values["config"]`` (a YAML file), if set.

    Values from the file are converted by the option's type, as a flag's would be.

    Raises:
        ConfigError: Unknown keys, or a value the option's type refuses.
    """
    path = values["config"]
    if path is None:
        return values
    config = section(load_yaml(path), config_section)
    merged = merge_options(values, given, config, allowed=set(values) - {"config"})
    params = {p.name: p for p in ctx.command.params}
    for key in {str(k).replace("-", "_") for k in config} - given:
        merged[key] = convert_config_value(ctx, params[key], key, merged[key])
    return merged


def convert_config_value(ctx: typer.Context, param: Any, key: str, value: Any) -> Any:
    """A config-file value converted by its option's type, as the flag's value would be (YAML reads ``8e-4`` as
    a string; a path becomes a ``Path``).

    Raises:
        ConfigError: The option's type refuses the value.
    """
    if value is None:
        return value
    try:
        return param.process_value(ctx, value)
    except Exception as exc:  # the option type's own message (BadParameter, a ClickException)
        message = getattr(exc, "message", None) or str(exc)
        raise ConfigError(f"config key '{key}': {message}") from None
