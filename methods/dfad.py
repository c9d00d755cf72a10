"""DFAD: adversarial distillation with the L1 distance between student and teacher
logits, for the generator's objective and the student's KD loss alike."""
from __future__ import annotations

from dataclasses import dataclass

from .config import BaseConfig, override, weight
from .generative import GeneratorSynthesizer, OneStageConfig
from .registry import register


@dataclass(frozen=True)
class DFADConfig(OneStageConfig):
    """Published preset (CIFAR-10, wrn40_2 -> wrn16_1): adv 1 with L1 on logits."""

    kd_criterion: str = override(BaseConfig, "kd_criterion", "l1")
    adv: float = weight(1.0, "negative mean |student logits - teacher logits|")


@register("dfad")
class DFAD(GeneratorSynthesizer):
    """Fang et al., "Data-Free Adversarial Distillation", arXiv:1912.11006, 2019."""

    Config = DFADConfig
    display = "DFAD"
    paper = "Fang et al., arXiv 2019"
    optimizes = "adversarial L1 on logits"
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "g_steps": {"type": "int", "low": 1, "high": 5},
        "adv": {"type": "loguniform", "low": 0.1, "high": 10.0},
    }

    def loss_terms(self, x, t_logits, t_features, hooks):
        return {"adv": self.adversarial(x, t_logits)}
