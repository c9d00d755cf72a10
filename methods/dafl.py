"""DAFL: a generator trained to make images the teacher classifies confidently, with
strong penultimate activations and balanced classes; the student plays no part."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .config import override, weight
from .generative import GeneratorConfig, GeneratorSynthesizer
from .losses import activation_loss, class_balance_loss
from .registry import register


@dataclass(frozen=True)
class DAFLConfig(GeneratorConfig):
    """Published preset (CIFAR-10, wrn40_2 -> wrn16_1): oh 1, act 0.001, balance 20."""

    latent_dim: int = override(GeneratorConfig, "latent_dim", 512)
    oh: float = weight(1.0, "cross-entropy against the teacher's own argmax")
    act: float = weight(0.001, "negative mean |penultimate feature| of the teacher")
    balance: float = weight(20.0, "negative entropy of the batch-mean prediction")


@register("dafl")
class DAFL(GeneratorSynthesizer):
    """Chen et al., "Data-Free Learning of Student Networks", ICCV 2019."""

    Config = DAFLConfig
    display = "DAFL"
    paper = "Chen et al., ICCV 2019"
    optimizes = "one-hot (teacher argmax), activation, class balance"
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "g_steps": {"type": "int", "low": 1, "high": 5},
        "oh": {"type": "uniform", "low": 0.0, "high": 2.0},
        "act": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
        "balance": {"type": "loguniform", "low": 1.0, "high": 50.0},
    }

    def loss_terms(self, x, t_logits, t_features, hooks):
        return {
            "oh": F.cross_entropy(t_logits, t_logits.argmax(dim=1)),
            "act": activation_loss(t_features),
            "balance": class_balance_loss(t_logits),
        }
