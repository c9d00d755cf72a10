"""The one user-error type: the entry points turn it into one message and exit code 2."""


class UsageError(Exception):
    """A user mistake: unknown name, bad value, missing data, unreadable checkpoint."""
