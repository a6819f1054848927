"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class PairtraceError(Exception):
    """Base class for errors that carry a user-facing explanation."""


class DataError(PairtraceError):
    """Input data is malformed (the message names the record and the field)."""


class ManifestMismatchError(PairtraceError):
    """Two artifacts were produced under different settings (model, layer, template or dataset)."""


class ConfigError(PairtraceError):
    """A configuration file or flag is invalid."""
