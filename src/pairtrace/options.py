"""YAML configuration files: read as data (never executed), merged under command-line flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pairtrace.errors import ConfigError


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
