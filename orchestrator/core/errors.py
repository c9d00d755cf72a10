"""The one user-error type (the entry points turn it into one message and exit code 2), and
SIGTERM as an orderly stop."""
import signal


class UsageError(Exception):
    """A user mistake: unknown name, bad value, missing data, unreadable checkpoint."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler, `kill`, a container stop): the same orderly stop as Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()


def keep_sigterm_handler(previous) -> None:
    """Puts raise_terminated back if it was the handler before a library replaced it (ray.init
    installs one that aborts the process, losing the orderly stop)."""
    if previous is raise_terminated:
        signal.signal(signal.SIGTERM, raise_terminated)
