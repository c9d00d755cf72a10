"""What every entry point shares: argument plumbing, input checks, and user errors turned
into one message and exit code 2. No entry point imports another; they all import this."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, NoReturn

from orchestrator.core.errors import Terminated, UsageError, raise_terminated

__all__ = ["ArgumentParser", "UsageError", "add_data_args", "add_guide_arg", "check_writable", "method_overrides",
           "parse_device", "parse_pairs", "parse_sets", "resolve_teacher", "run_cli", "split_list"]


def user_error_types() -> tuple[type[BaseException], ...]:
    # The packages below raise ValueError subclasses for user-facing problems; importing
    # them here keeps one list of what counts as "the user's input was wrong".
    from benchmarks.datasets import DatasetError
    from methods import ConfigError, UnknownMethodError
    from models import UnknownModelError
    from orchestrator.tracking import TrackingError
    return UsageError, DatasetError, UnknownModelError, TrackingError, ConfigError, UnknownMethodError


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits with 2 already; this keeps its message to one line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Runs `main`, turning user errors into `error: ...` on stderr and exit code 2, and
    Ctrl-C or SIGTERM into an orderly stop that keeps finished work (exit 130 / 143).

    Called as the program (`argv` None, the `__main__` blocks), it freezes the objects alive
    at the end (`gc.freeze`) before exiting: the interpreter's last garbage collections then
    skip them. With torch, Ray and MLflow loaded that is about 700,000 objects, and those
    collections kept a finished bench's prompt waiting 3.6 s on a 2.45 GHz Zen 3 core
    (0.6 s frozen; docs/results/speed.md, session 14). Nothing is left to collect by then: files
    are closed, runs ended and Ray stopped by `main` itself; atexit handlers still run."""
    import signal

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = main(argv) or 0
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as exc:
        stopped = isinstance(exc, Terminated)
        print(f"{'terminated' if stopped else 'interrupted'}; finished work is kept on disk", file=sys.stderr)
        code = 143 if stopped else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if argv is None:
        import gc
        gc.freeze()
    sys.exit(code)


# ------------------------------------------------------------------------ arguments
def add_data_args(parser: ArgumentParser) -> None:
    from orchestrator.core.classifiers import DEFAULT_DIR

    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is not found")
    parser.add_argument("--teacher-dir", default=str(DEFAULT_DIR),
                        help="where teachers are cached (trained there when missing)")


def add_guide_arg(parser: ArgumentParser) -> None:
    parser.add_argument("--guide", metavar="KIND:K", default="",
                        help="a guide set for guided inversion (docs/methods.md): real:K = K training images per "
                             "class, condensed:K = the set `python -m orchestrator.condense` cached; fixed by guide "
                             "seed 0, so every training seed reads the same set. Read by guide>0, guide_mix>0 "
                             "and the samples method")


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


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`--set a=1 --set b=2` or `--set a=1,b=2` -> {"a": "1", "b": "2"}."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise UsageError(f"--set {part!r}: expected key=value")
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def split_list(text: str, what: str) -> list[str]:
    """`a,b,c` -> [a, b, c] (duplicates dropped); an empty item is a typo, refused."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise UsageError(f"--{what} is empty")
    if not all(items):
        raise UsageError(f"--{what} {text!r} has an empty item (two commas, or one at an end)")
    return list(dict.fromkeys(items))


def parse_pairs(text: str | None, dataset: str) -> list[tuple[str, str]]:
    from benchmarks.suites import suite

    if not text:
        return suite(dataset)
    pairs = []
    for item in split_list(text, "pairs"):
        if item.count(":") != 1 or not all(item.split(":")):
            raise UsageError(f"--pairs {item!r}: expected teacher:student, e.g. wrn40_2:wrn16_1")
        pairs.append(tuple(item.split(":")))
    return pairs


def method_overrides(methods: list[str], sets: dict[str, str], presets: list[str] | None) -> dict[str, dict]:
    """Per-method overrides from presets and --set (METHOD.KEY beats KEY beats preset)."""
    from methods import get_method

    per_method: dict[str, dict] = {m: {} for m in methods}
    for path in presets or []:
        preset = read_preset(path)
        try:
            method, config = preset["method"], dict(preset["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"--preset {path}: not a preset file written by orchestrator.tune (no {exc})") from None
        get_method(method)
        if method not in per_method:
            raise UsageError(f"--preset {path} is for method {method!r}, which is not in --methods")
        per_method[method].update(config)
    used = set()
    for key, value in sets.items():
        target, _, field = key.rpartition(".")
        targets = [target] if target else methods
        if target and target not in per_method:
            raise UsageError(f"--set {key}: method {target!r} is not in --methods ({', '.join(methods)})")
        for m in targets:
            if field in {f.name for f in dataclasses.fields(get_method(m).Config)}:
                per_method[m][field] = value
                used.add(key)
        if key not in used:
            raise UsageError(f"--set {key}: no method in --methods has a field {field!r}")
    return per_method


def read_data_file(path: str | Path, flag: str):
    """A JSON or YAML file's content (JSON first: YAML 1.1 would read 1e-4 as a string);
    unreadable or malformed files are one UsageError naming the flag, line and column."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UsageError(f"{flag} {path}: not valid JSON or YAML: {where}{problem}") from None


def read_preset(path: str | Path) -> dict:
    """A preset in JSON (as orchestrator.tune writes it) or YAML."""
    preset = read_data_file(path, "--preset")
    if not isinstance(preset, dict):
        raise UsageError(f"--preset {path}: expected a mapping with 'method' and 'config'")
    return preset


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: not writable ({exc.strerror or exc})") from None


def resolve_teacher(dataset: str, arch: str, teacher_dir: str | Path, teacher_ckpt: str | Path | None = None,
                    **train_options) -> Path:
    """The teacher checkpoint a cell reads: `--teacher-ckpt` (checked against `--teacher`),
    or the cached one, trained first when missing (`train_options` go to the trainer)."""
    from orchestrator.core.cell import load_teacher
    from orchestrator.core.classifiers import checkpoint_path, get_classifier

    if teacher_ckpt:
        _, meta = load_teacher(str(Path(teacher_ckpt).resolve()), dataset)
        if meta.get("arch") != arch:
            raise UsageError(f"--teacher-ckpt {teacher_ckpt} holds a {meta.get('arch')}, not a "
                             f"{arch}: pass --teacher {meta.get('arch')}")
        return Path(teacher_ckpt).resolve()
    get_classifier(dataset, arch, out=teacher_dir, **train_options)
    return checkpoint_path(Path(teacher_dir), dataset, arch).resolve()


class OutLock:
    """One writer per output folder: `<out>/.lock` holds the owner's PID and host. A second
    run on the same folder refuses at once, naming the first; a lock whose process is gone
    (killed, crashed) is taken over, with a message."""

    def __init__(self, out: Path, what: str, log=print):
        self.path, self.what, self.log = Path(out) / ".lock", what, log

    def __enter__(self) -> "OutLock":
        import os
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "argv": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and self._alive(owner):
                    raise UsageError(f"another {self.what} (pid {owner['pid']} on {owner['host']}, started "
                                     f"{owner['started']}) is writing to {self.path.parent}; wait for it to end or "
                                     f"use another --out") from None
                self.log(f"taking over the lock of a {self.what} that is gone "
                         f"(pid {owner.get('pid') if owner else '?'}): {self.path}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise UsageError(f"cannot take the lock {self.path}: another run keeps taking it")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner: dict) -> bool:
        import os
        import socket

        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: cannot be checked from here, so it counts
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def __exit__(self, *exc) -> None:
        owner = self._owner()
        import os

        if owner and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
