"""Errors with exit codes: 2 = unusable input or usage, 1 = a check that ran and failed."""


class ConvGraphError(Exception):
    """Base error; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class ModelError(ConvGraphError):
    """The model (or an input given with it) cannot be used."""


class UsageError(ConvGraphError):
    """A flag or argument is wrong."""


class CheckFailed(ConvGraphError):
    """A check ran and failed (tolerance exceeded, exact rewrite off)."""

    exit_code = 1


class ConvGraphWarning(UserWarning):
    """Something the user can fix (e.g. an unset dynamic dim); the analysis goes on."""
