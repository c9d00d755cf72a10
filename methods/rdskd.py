"""RDSKD: a generator whose images the teacher classifies confidently (authenticity), in
balanced classes (class diversity), with its two half-batches far apart (inter-sample
diversity). The first two objectives conflict and make the loss fluctuate; RDSKD damps
that by putting each of them through exp(loss - earlier loss). The student plays no part.

The loss is taken from the authors' code (github.com/PengchaoHan/RDSKD, generator-train.py
and student-train.py, commit 8512a9d): the paper's own text beyond its abstract was not
available to us. Where that code and our loop differ, docs/methods.md says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budgets import GENERATOR_BUDGETS, SMOKE
from .config import BaseConfig, ConfigError, override, param, weight
from .generative import GeneratorConfig, GeneratorSynthesizer
from .losses import class_balance_loss, exp_increment_penalty, pair_diversity_loss
from .registry import register


@dataclass(frozen=True)
class RDSKDConfig(GeneratorConfig):
    """The authors' MNIST settings: the generator alone first (20 epochs of 120 steps,
    batch 512 = two halves of 256, Adam lr 1e-3, latent 100), then the student (1000 epochs
    of 120 steps, batch 512, KL at T = 10); unit weights, the paper's point being that no
    weight needs tuning."""

    epochs: int = override(BaseConfig, "epochs", 1020)
    warmup_epochs: int = override(BaseConfig, "warmup_epochs", 20)
    ep_steps: int = override(BaseConfig, "ep_steps", 120)
    kd_steps: int = override(GeneratorConfig, "kd_steps", 1)  # 120 generator steps per warm-up epoch
    batch_size: int = override(BaseConfig, "batch_size", 512)
    synthesis_batch_size: int = override(BaseConfig, "synthesis_batch_size", 512)
    T: float = override(GeneratorConfig, "T", 10.0)
    latent_dim: int = override(GeneratorConfig, "latent_dim", 100)
    oh: float = weight(1.0, "exp-penalised cross-entropy against the teacher's own argmax (authenticity)")
    balance: float = weight(1.0, "exp-penalised negative entropy of the batch-mean prediction (class diversity)")
    ds: float = weight(1.0, "teacher-output gap / image gap between the two half-batches (inter-sample diversity)")
    ref_every: int = param(1, ge=1, help="generator steps between refreshes of the penalty's reference losses "
                                         "(1: the previous step's; the authors' code: once per 120)")

    def validate(self) -> None:
        super().validate()
        if self.synthesis_batch_size < 2:
            raise ConfigError(f"synthesis_batch_size ({self.synthesis_batch_size}) must be at least 2 for rdskd: "
                              "its diversity term pairs the two halves of a batch")


@register("rdskd")
class RDSKD(GeneratorSynthesizer):
    """Han, Park, Wang and Liu, "Robustness and Diversity Seeking Data-Free Knowledge
    Distillation", ICASSP 2021 (arXiv:2011.03749)."""

    Config = RDSKDConfig
    display = "RDSKD"
    paper = "Han et al., ICASSP 2021"
    optimizes = "one-hot, class balance (each exponentially penalised when it rises), inter-sample diversity"
    # Smoke runs one epoch, so it cannot keep a warm-up epoch; cpu keeps one of its ten.
    budgets = {"smoke": {**SMOKE, "warmup_epochs": 0},
               "cpu": {**GENERATOR_BUDGETS["cpu"], "warmup_epochs": 1}}
    adam_betas = (0.9, 0.999)  # the authors' Adam has PyTorch's default betas
    PENALIZED = ("oh", "balance")  # the two conflicting terms; the diversity term is not penalised
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "g_steps": {"type": "int", "low": 1, "high": 5},
        "ds": {"type": "loguniform", "low": 0.1, "high": 10.0},
        "ref_every": {"type": "int", "low": 1, "high": 120},
    }

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        # The penalty's state across steps: each penalised term's reference value and the
        # number of generator steps taken (0: no reference yet). Checkpointed, so a resumed
        # cell penalises exactly as the uninterrupted one.
        self.references = {name: 0.0 for name in self.PENALIZED}
        self.penalty_steps = 0

    def loss_terms(self, x, t_logits, t_features, hooks):
        return {
            "oh": F.cross_entropy(t_logits, t_logits.argmax(dim=1)),
            "balance": class_balance_loss(t_logits),
            "ds": pair_diversity_loss(x, t_logits),
        }

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_name w_name * exp(L_name - ref_name) over the penalised terms, plus w_ds * L_ds.
        The first step has no earlier loss; its reference is its own value (a factor of 1),
        where the authors' code starts from a reference of 0."""
        weights = self.config.weights()
        total = 0.0
        for name, value in terms.items():
            if name in self.PENALIZED:
                reference = self.references[name] if self.penalty_steps else value
                value = exp_increment_penalty(value, reference)
            total = total + weights[name] * value
        return total

    def after_step(self, terms: dict[str, torch.Tensor]) -> None:
        if self.penalty_steps % self.config.ref_every == 0:
            self.references = {name: float(terms[name].detach()) for name in self.PENALIZED}
        self.penalty_steps += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "references": dict(self.references), "penalty_steps": self.penalty_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.references = {name: float(state["references"][name]) for name in self.PENALIZED}
        self.penalty_steps = int(state["penalty_steps"])
