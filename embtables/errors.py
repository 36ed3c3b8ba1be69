"""Errors a user can act on: each names the file, row or key at fault."""


class EmbtablesError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(EmbtablesError):
    """A config key is unknown, missing or has the wrong type."""


class DataError(EmbtablesError):
    """Input data is malformed; the message names the file and row or column."""


class ExportError(EmbtablesError):
    """An export artifact is corrupt, incomplete or from a newer version."""
