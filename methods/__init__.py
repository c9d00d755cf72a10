"""Data-free knowledge distillation methods: one module per method, one registry.

    from methods import create_synthesizer, make_config, ImageSpec
    cfg = make_config("cmi", budget="cpu", overrides={"g_steps": "40"})
    synth = create_synthesizer("cmi", teacher, student, cfg, spec, device="cuda")
    result = synth.synthesize()          # images in [0, 1] + named loss terms
    x = synth.sample(cfg.batch_size)     # one KD batch

Methods (module name = registry name = CLI name): dafl zskt dfad deepinv dfq cmi fast nayer rdskd,
and `samples` (KD on a guide set alone, a baseline of guided inversion: methods/guided.py).
The student's KD loss (with the CRD option, `kd_criterion=kl+crd`) is `KDObjective` (crd.py).
Plain PyTorch: nothing here imports ray or mlflow.
"""
from __future__ import annotations

from typing import Any, Mapping

from .bank import InstanceBank, from_uint8, to_uint8
from .base import SynthesisResult, Synthesizer, place
from .config import BUDGETS, BaseConfig, ConfigError, apply_overrides
from .crd import KDObjective
from .losses import kd_loss
from .registry import UnknownMethodError, get_method, list_methods
from .spec import ImageSpec

# Imported for their side effect: each module registers its method, in table order.
from . import dafl, zskt, dfad, deepinv, dfq, cmi, fast, nayer, rdskd, samples  # noqa: E402,F401  isort: skip


def make_config(name: str, budget: str = "paper", overrides: Mapping[str, Any] | None = None) -> BaseConfig:
    """The method's published preset, scaled to `budget`, then `overrides` applied.

    String overrides (from `--set key=value`) are parsed to the field's type; an unknown
    field, a wrong type or an out-of-range value raises ConfigError.
    """
    cls = get_method(name)
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    return apply_overrides(cls.Config, cls.budgets.get(budget, {}), overrides or {})


def create_synthesizer(name: str, teacher, student, config: BaseConfig, spec: ImageSpec,
                       bank: InstanceBank | None = None, device="cpu") -> Synthesizer:
    """Build method `name`'s synthesizer; inversion methods create their own bank if
    none is given."""
    return get_method(name)(teacher, student, config, spec, bank=bank, device=device)


__all__ = [
    "BUDGETS", "BaseConfig", "ConfigError", "ImageSpec", "InstanceBank", "KDObjective", "SynthesisResult",
    "Synthesizer", "UnknownMethodError", "create_synthesizer", "from_uint8", "get_method",
    "kd_loss", "list_methods", "make_config", "place", "to_uint8",
]
