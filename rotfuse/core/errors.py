"""The few error types the CLI maps to exit codes.

Anything raised as `InputError` or `UsageError` is the user's to fix: the CLI prints its message
as one line and exits 2. Every other exception is a bug in rotfuse and exits 1.
"""


class RotfuseError(Exception):
    """Base of the errors whose message is meant for the user, as one line."""

    exit_code = 2


class UsageError(RotfuseError):
    """Flags or options that do not make sense together."""


class InputError(RotfuseError):
    """A checkpoint, config, spec or data file that is missing, corrupt or incompatible."""


class OutputError(RotfuseError):
    """The output cannot be written (exists, inside an input, no permission, disk full)."""
