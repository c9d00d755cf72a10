"""What every entry point shares: user errors become one message and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class UsageError(Exception):
    """A user mistake: unknown name, bad value, missing data, unreadable checkpoint."""


def user_error_types() -> tuple[type[BaseException], ...]:
    # The packages below raise ValueError subclasses for user-facing problems; importing
    # them here keeps one list of what counts as "the user's input was wrong".
    from benchmarks.datasets import DatasetError
    types: list[type[BaseException]] = [UsageError, DatasetError]
    try:
        from models import UnknownModelError
        types.append(UnknownModelError)
    except ImportError:
        pass
    try:
        from orchestrator.tracking import TrackingError
        types.append(TrackingError)
    except ImportError:
        pass
    try:
        from methods import ConfigError, UnknownMethodError
        types.extend([ConfigError, UnknownMethodError])
    except ImportError:
        pass
    return tuple(types)


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits with 2 already; this keeps its message to one line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Runs `main`, turning user errors into `error: ...` on stderr and exit code 2."""
    try:
        code = main(argv)
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept on disk", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def parse_device(name: str) -> str:
    """'auto' picks CUDA when present, CPU otherwise."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return name
