"""DFQ: a generator whose images match the teacher's BatchNorm statistics, are
classified confidently and in balanced classes, and challenge the student."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .config import override, weight
from .generative import GeneratorConfig, GeneratorSynthesizer
from .losses import class_balance_loss
from .registry import register


@dataclass(frozen=True)
class DFQConfig(GeneratorConfig):
    """Published preset (CIFAR-10, wrn40_2 -> wrn16_1): adv 1, bn 1, oh 1, balance 20,
    a synthesis round every 10 student steps."""

    kd_steps: int = override(GeneratorConfig, "kd_steps", 10)
    adv: float = weight(1.0, "negative student/teacher KL")
    bn: float = weight(1.0, "distance to the teacher's BN running statistics")
    oh: float = weight(1.0, "cross-entropy against the teacher's own argmax")
    balance: float = weight(20.0, "negative entropy of the batch-mean prediction")


@register("dfq")
class DFQ(GeneratorSynthesizer):
    """Choi et al., "Data-Free Network Quantization With Adversarial Knowledge
    Distillation", CVPR Workshops 2020."""

    Config = DFQConfig
    display = "DFQ"
    paper = "Choi et al., CVPRW 2020"
    optimizes = "BN statistics, one-hot, adversarial KL, class balance"
    uses_bn_stats = True
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "g_steps": {"type": "int", "low": 1, "high": 5},
        "adv": {"type": "loguniform", "low": 0.1, "high": 10.0},
        "bn": {"type": "loguniform", "low": 0.1, "high": 10.0},
        "oh": {"type": "uniform", "low": 0.0, "high": 2.0},
        "balance": {"type": "loguniform", "low": 1.0, "high": 50.0},
    }

    def loss_terms(self, x, t_logits, t_features, hooks):
        terms = {
            "bn": hooks.bn_loss(),
            "oh": F.cross_entropy(t_logits, t_logits.argmax(dim=1)),
            "balance": class_balance_loss(t_logits),
        }
        if self.uses_student:
            terms["adv"] = self.adversarial(x, t_logits)
        return terms
