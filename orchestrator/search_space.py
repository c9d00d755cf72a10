"""Search spaces: the plain format methods and `--space FILE` use, checked, then turned
into Ray Tune distributions.

    {"lr_g":    {"type": "loguniform", "low": 1e-4, "high": 1e-2},
     "oh":      {"type": "uniform", "low": 0.0, "high": 2.0},
     "g_steps": {"type": "int", "low": 1, "high": 5},            # both ends included
     "synthesis_batch_size": {"type": "int", "low": 64, "high": 256, "step": 64},  # 64 ... 256
     "kd_criterion": {"type": "choice", "values": ["kl", "l1"]}}

`check_space` refuses, with one UsageError line, everything that would otherwise fail
inside a trial: a field the method does not have, an unknown type, an empty or
mistyped range, and bounds that the method's Config itself rejects (each bound and each
choice is built with `make_config` together with the fixed `--set` values).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

from methods import ConfigError, get_method, make_config
from orchestrator.cli import UsageError

TYPES = ("loguniform", "uniform", "int", "choice")
_KEYS = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "int": {"low", "high", "step"},
         "choice": {"values"}}


def load_space(path: str | Path) -> dict:
    """A space from a JSON or YAML file."""
    from orchestrator.cli import read_data_file

    return _mapping(read_data_file(path, "--space"), path)


def _mapping(space, path) -> dict:
    if not isinstance(space, dict) or not space:
        raise UsageError(f"--space {path}: expected a non-empty mapping field -> "
                         '{"type": ..., ...}, e.g. {"lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}')
    return space


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse(x):
    """YAML reads `1e-4` (no dot) as a string: numeric strings become numbers."""
    if isinstance(x, str):
        for kind in (int, float):
            try:
                return kind(x)
            except ValueError:
                pass
    return x


def check_space(method: str, space: dict, budget: str = "cpu", fixed: dict | None = None) -> dict:
    """Returns `space` with ranges normalised (numbers, not strings); raises UsageError."""
    cls = get_method(method)
    fixed = dict(fixed or {})
    hints = typing.get_type_hints(cls.Config)
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    out = {}
    for name, dist in space.items():
        where = f"search space field {name!r}"
        if name not in fields:
            raise UsageError(f"{where}: {method} has no such setting; valid: {', '.join(fields)}")
        if name in fixed:
            raise UsageError(f"{where} is also fixed with --set; drop one of them")
        if not isinstance(dist, dict) or dist.get("type") not in TYPES:
            got = dist.get("type") if isinstance(dist, dict) else dist
            raise UsageError(f"{where}: unknown distribution {got!r}; use one of {', '.join(TYPES)}")
        kind, ftype = dist["type"], hints[name]
        required = {"values"} if kind == "choice" else {"low", "high"}
        extra = set(dist) - _KEYS[kind] - {"type"}
        if extra or not required <= set(dist):
            raise UsageError(f"{where}: a {kind} distribution takes {', '.join(sorted(_KEYS[kind]))}"
                             + (f", not {', '.join(sorted(extra))}" if extra else ""))
        if kind == "choice":
            values = dist["values"]
            if not isinstance(values, list) or not values:
                raise UsageError(f"{where}: choice needs a non-empty list of values")
            probes = values
        else:
            dist = {k: _parse(v) if k in ("low", "high", "step") else v for k, v in dist.items()}
            low, high = dist["low"], dist["high"]
            if not (_number(low) and _number(high)):
                raise UsageError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
            if ftype not in (int, float):
                raise UsageError(f"{where}: {name} is a {ftype.__name__} setting; use a choice")
            if kind == "int":
                step = dist.get("step", 1)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)) or step < 1:
                    raise UsageError(f"{where}: an int range needs whole-number low, high (and step >= 1), "
                                     f"got low={low!r} high={high!r}")
                if (high - low) % step:
                    raise UsageError(f"{where}: high - low ({high - low}) must be a multiple of step ({step})")
            elif ftype is int:
                raise UsageError(f"{where}: {name} is an int setting; use type int, not {kind}")
            if not low < high:
                raise UsageError(f"{where}: empty range, low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise UsageError(f"{where}: loguniform needs low > 0, got {low}")
            probes = [low, high]
        for value in probes:
            try:
                make_config(method, budget, {**fixed, name: value})
            except ConfigError as exc:
                raise UsageError(f"{where}: the value {value!r} is not a valid {method} setting ({exc})") from None
        out[name] = dict(dist)
    if not out:
        raise UsageError(f"the search space of {method} is empty; give one with --space FILE")
    return out


def to_tune(space: dict) -> dict:
    """Plain (checked) space -> Ray Tune sample domains, which OptunaSearch converts."""
    from ray import tune

    out = {}
    for name, d in space.items():
        kind = d["type"]
        if kind == "loguniform":
            out[name] = tune.loguniform(d["low"], d["high"])
        elif kind == "uniform":
            out[name] = tune.uniform(d["low"], d["high"])
        elif kind == "int" and d.get("step", 1) > 1:
            out[name] = tune.qrandint(d["low"], d["high"], d["step"])  # upper bound included
        elif kind == "int":
            out[name] = tune.randint(d["low"], d["high"] + 1)  # randint excludes its upper bound
        else:
            out[name] = tune.choice(d["values"])
    return out


def space_json(space: dict) -> str:
    return json.dumps(space, sort_keys=True)
