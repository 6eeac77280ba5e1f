"""Errors a user can act on. The CLI prints their message without a traceback."""


class ToolchainError(Exception):
    """Base class: the message names the problem and, where possible, the fix. `exit_status`: the CLI's (2, a
    usage or input error; a check that found a mismatch says 1)."""

    exit_status = 2


class ConfigError(ToolchainError, ValueError):
    """An option is out of range or inconsistent with the model."""


class ModelLoadError(ToolchainError):
    """A model path is missing, corrupt, or of an unsupported family."""


class DataError(ToolchainError):
    """Calibration or evaluation text could not be obtained."""
