"""Method configurations: frozen dataclasses whose defaults are the published preset.

Every method's `Config` extends `BaseConfig`. A field's constraints sit in its metadata
(`gt`, `ge`, `le`, `choices`), so one `validate()` checks every method, and each
config checks itself on construction: `Config(**asdict(cfg))` round-trips, and a bad
value can never reach a synthesizer.

    cfg = make_config("cmi", budget="cpu", overrides={"lr_g": "3e-3", "g_steps": 40})
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .losses import KD_CRITERION_CHOICES


class ConfigError(ValueError):
    """A bad configuration value; the message is one line saying what and how to fix it."""


BUDGETS = ("smoke", "cpu", "paper")


def param(default, *, gt=None, ge=None, le=None, choices=None, help: str = "", weight: bool = False,
          late: bool = False):
    """A config field with its valid range; `help` documents it. `weight=True` marks a
    loss weight: the field's name is the name of the loss term it scales. `late=True` marks
    a field added after results were recorded: while it is at its default it is left out
    of the config's identity (`identity`), so configs saved before it existed still match."""
    meta = {k: v for k, v in dict(gt=gt, ge=ge, le=le, choices=choices, help=help).items()
            if v is not None}
    if weight:
        meta["weight"] = True
    if late:
        meta["late"] = True
    return field(default=default, metadata=meta)


def weight(default: float, help: str = "", late: bool = False):
    """A non-negative loss weight named after its loss term."""
    return param(float(default), ge=0, help=help, weight=True, late=late)


@dataclass(frozen=True)
class BaseConfig:
    """Fields every method has: the loop's schedule, batch sizes, optimisers, KD loss."""

    epochs: int = param(200, ge=1, help="training epochs")
    ep_steps: int = param(400, ge=1, help="student updates per epoch")
    kd_steps: int = param(400, ge=1, help="student updates after each synthesis round")
    g_steps: int = param(1, ge=1, help="optimisation steps per synthesis round")
    batch_size: int = param(256, ge=1, help="KD batch size")
    synthesis_batch_size: int = param(256, ge=1, help="images per synthesis round")
    lr: float = param(0.1, gt=0, help="student learning rate (SGD)")
    lr_g: float = param(1e-3, gt=0, help="synthesis learning rate (Adam)")
    T: float = param(20.0, gt=0, help="KD temperature")
    kd_criterion: str = param("kl", choices=KD_CRITERION_CHOICES,
                              help="student KD loss: kl or l1 on logits; +crd adds CRD (methods/crd.py)")
    warmup_epochs: int = param(0, ge=0, help="first epochs that only synthesize (no KD), e.g. Fast-DFKD, NAYER")
    guide_mix: float = param(0.0, ge=0, le=1, late=True,
                             help="fraction of every KD batch replaced by augmented guide images (--guide)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(f.name, hints[f.name], getattr(self, f.name))
            # Frozen: store the coerced value (an int given for a float field) this way.
            object.__setattr__(self, f.name, value)
            _check_range(f, value)
        if self.kd_steps > self.ep_steps:
            raise ConfigError(f"kd_steps ({self.kd_steps}) must not exceed ep_steps ({self.ep_steps}): "
                              "each epoch runs ep_steps // kd_steps synthesis rounds")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}): "
                              "a cell must distill in at least one epoch")

    def weights(self) -> dict[str, float]:
        """Loss weights by term name; a method's loss term `x` is weighted by field `x`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("weight")}

    # What a config's non-default options add, declared next to the fields they read: a
    # subclass extends both lists with its own fields (its entries first).

    def row_suffixes(self) -> list[str]:
        """Suffixes of the method's row label in result tables (`Synthesizer.row_label`),
        one per option that makes this config a variant of the plain method."""
        out = [" +mix"] if self.guide_mix > 0 else []
        return out + ([" +CRD"] if "crd" in self.kd_criterion else [])

    def guide_uses(self) -> list[str]:
        """Why this config reads a guide set (`--guide KIND:K`); empty when it does not."""
        return [f"guide_mix={self.guide_mix} mixes guide images into every KD batch"] if self.guide_mix > 0 else []


def identity_of(config_cls: type, values: Mapping[str, Any]) -> dict:
    """The entries of `values` (a config as a dict, e.g. one saved in a state file) that
    identify a run: all of them except `late` fields at their default, so a config saved
    before a late field existed equals today's config with that field at its default."""
    late = {f.name: f.default for f in dataclasses.fields(config_cls) if f.metadata.get("late")}
    return {k: v for k, v in values.items() if not (k in late and v == late[k])}


def identity(config: BaseConfig) -> dict:
    """`identity_of` a config object: what its hash and resume checks compare."""
    return identity_of(type(config), dataclasses.asdict(config))


def same_identity(stored: Mapping[str, Any] | None, config: BaseConfig) -> bool:
    """Whether a saved config dict is this config (late fields at their default may be absent)."""
    return isinstance(stored, Mapping) and identity_of(type(config), stored) == identity(config)


def override(base: type, name: str, default):
    """Redeclare field `name` of `base` with a new default, keeping its constraints."""
    return field(default=default, metadata=base.__dataclass_fields__[name].metadata)


def _check_type(name: str, kind: type, value: Any) -> Any:
    # bool is an int subclass; `True` steps or weights are always a typo.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def _check_range(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    if "gt" in m and not value > m["gt"]:
        raise ConfigError(f"{f.name} must be > {m['gt']}, got {value!r}")
    if "ge" in m and not value >= m["ge"]:
        raise ConfigError(f"{f.name} must be >= {m['ge']}, got {value!r}")
    if "le" in m and not value <= m["le"]:
        raise ConfigError(f"{f.name} must be <= {m['le']}, got {value!r}")
    if "choices" in m and value not in m["choices"]:
        raise ConfigError(f"{f.name} must be one of {', '.join(map(str, m['choices']))}, got {value!r}")


def parse_value(name: str, kind: type, text: str) -> Any:
    """Parse a `--set key=value` string to the field's type."""
    text = text.strip()
    try:
        if kind is int:
            number = float(text)  # accepts "1e3"; must still be a whole number
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            return float(text)
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name} must be {kind.__name__}, got {text!r}") from None
    return text


def apply_overrides(config_cls: type, values: Mapping[str, Any], overrides: Mapping[str, Any]):
    """`config_cls(**values, **overrides)`, with string overrides parsed and clear errors."""
    hints = typing.get_type_hints(config_cls)
    known = [f.name for f in dataclasses.fields(config_cls)]
    merged = dict(values)
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} for {config_cls.__qualname__}; "
                              f"valid: {', '.join(known)}")
        merged[key] = parse_value(key, hints[key], value) if isinstance(value, str) else value
    return config_cls(**merged)
