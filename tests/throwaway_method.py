"""A throwaway method that lives outside methods/: the shape of every new method (one
class, its config, its registration), used to show that adding one needs no edit anywhere
else. Loaded through DFKD_METHOD_MODULES=tests.throwaway_method (tests/test_registry.py,
tests/test_cluster.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from methods.config import weight
from methods.generative import GeneratorConfig, GeneratorSynthesizer
from methods.registry import register


@dataclass(frozen=True)
class ThrowawayConfig(GeneratorConfig):
    oh: float = weight(1.0, "cross-entropy against the teacher's own argmax")


@register("throwaway")
class Throwaway(GeneratorSynthesizer):
    """A generator trained only to make the teacher confident (DAFL's first term, 2019)."""

    Config = ThrowawayConfig
    display = "Throwaway"
    paper = "a test fixture, 2026"
    optimizes = "one-hot (teacher argmax)"

    def loss_terms(self, x, t_logits, t_features, hooks):
        return {"oh": F.cross_entropy(t_logits, t_logits.argmax(dim=1))}
