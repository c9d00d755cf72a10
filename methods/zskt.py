"""ZSKT: a generator that maximises the student/teacher disagreement (KL), so the
student is always trained where it imitates the teacher worst."""
from __future__ import annotations

from dataclasses import dataclass

from .config import weight
from .generative import GeneratorSynthesizer, OneStageConfig
from .registry import register


@dataclass(frozen=True)
class ZSKTConfig(OneStageConfig):
    """Published preset (CIFAR-10, wrn40_2 -> wrn16_1): adv 1, KL at T=1 (see T)."""

    adv: float = weight(1.0, "negative student/teacher KL")


@register("zskt")
class ZSKT(GeneratorSynthesizer):
    """Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief
    Matching", NeurIPS 2019. As in the reference benchmark, without its attention-
    transfer term."""

    Config = ZSKTConfig
    display = "ZSKT"
    paper = "Micaelli & Storkey, NeurIPS 2019"
    optimizes = "adversarial KL (student vs teacher)"
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "g_steps": {"type": "int", "low": 1, "high": 5},
        "adv": {"type": "loguniform", "low": 0.1, "high": 10.0},
    }

    def loss_terms(self, x, t_logits, t_features, hooks):
        return {"adv": self.adversarial(x, t_logits)}
