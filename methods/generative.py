"""Shared machinery of the generator methods (DAFL, ZSKT, DFAD, DFQ, RDSKD).

A generator G maps z ~ N(0, I) to images; each synthesis round takes `g_steps` Adam
steps on G's parameters, each on a fresh z, and every KD step samples a fresh batch
from G. Subclasses only say which loss terms they use (`loss_terms`).
"""
from __future__ import annotations

import abc
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from models import create_generator

from .base import SynthesisResult, Synthesizer, eval_mode, place
from .budgets import GENERATOR_BUDGETS
from .config import BaseConfig, ConfigError, override, param
from .hooks import BatchNormHooks
from .losses import kd_loss


@dataclass(frozen=True)
class GeneratorConfig(BaseConfig):
    """What the generator methods share: a synthesis round (one generator step) every
    5 student steps, Adam lr 1e-3, latent size 256 (DAFL: 512)."""

    kd_steps: int = override(BaseConfig, "kd_steps", 5)
    g_steps: int = override(BaseConfig, "g_steps", 1)
    lr_g: float = override(BaseConfig, "lr_g", 1e-3)
    # The published command lines pass T=20, but the reference code replaces the KD
    # criterion of the generator methods by KL at T=1 (L1 on logits for DFAD), for the
    # student's KD steps and for the generator's adversarial term alike, so T=20 never
    # takes effect. The published numbers were produced with T=1; so is our default.
    T: float = override(BaseConfig, "T", 1.0)
    latent_dim: int = param(256, ge=1, help="generator latent size")


@dataclass(frozen=True)
class OneStageConfig(GeneratorConfig):
    """A generator method whose generator loss is exactly adv * -(the student's KD loss),
    with no other term (DFAD, ZSKT): its two stages may merge into joint steps, one forward
    and one backward each (Shen et al., CVPR 2021; docs/methods.md, "One-stage updates")."""

    one_stage: bool = param(False, help="joint generator/student steps: one forward and one backward for both")

    def validate(self) -> None:
        super().validate()
        if not self.one_stage:
            return
        # Each joint step is a generator step and a student step on the same batch; the
        # generator can only mirror the student's loss if that loss is the plain logit one.
        reasons = [
            (self.g_steps > self.kd_steps, f"g_steps ({self.g_steps}) must not exceed kd_steps ({self.kd_steps}): "
                                           "each generator step is also one of the round's KD steps"),
            (self.synthesis_batch_size != self.batch_size,
             f"synthesis_batch_size ({self.synthesis_batch_size}) must equal batch_size ({self.batch_size}): "
             "a joint step trains generator and student on one batch"),
            ("+" in self.kd_criterion, f"kd_criterion {self.kd_criterion!r} adds a term the generator does not "
                                       "maximise; use kl or l1"),
            (self.warmup_epochs > 0, "warmup_epochs must be 0: a joint step needs a student step"),
            (self.guide_mix > 0, "guide_mix must be 0: a joint step's KD batch is the generator's own"),
        ]
        for bad, why in reasons:
            if bad:
                raise ConfigError(f"one_stage=true: {why}")

    def row_suffixes(self) -> list[str]:
        return ([" one-stage"] if self.one_stage else []) + super().row_suffixes()


class GeneratorSynthesizer(Synthesizer):
    kind = "generator"
    fresh_kd_batches = True  # every KD step trains on a fresh batch from the generator
    budgets = GENERATOR_BUDGETS

    @classmethod
    def store_capacity(cls, config):
        """One round of fresh KD images (its kd_steps batches less the joint steps', which
        use the generator's own batch), for a runtime that ships them."""
        return max(config.kd_steps - cls.joint_steps(config), 1) * config.batch_size, None

    @classmethod
    def joint_steps(cls, config) -> int:
        # A capability of the config: only OneStageConfig has the switch.
        return config.g_steps if getattr(config, "one_stage", False) else 0
    # DFQ's BN prior needs the teacher's BatchNorm hooks; the others skip their cost.
    uses_bn_stats = False
    # Adam with beta1 = 0.5, the GAN setting of the benchmark code's generator methods; a
    # method whose authors used other betas says so here (RDSKD: Adam's defaults).
    adam_betas: tuple[float, float] = (0.5, 0.999)

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        self.generator = place(create_generator(
            "generator", config.latent_dim, spec.image_size, spec.channels), self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=self.adam_betas)
        self._joint_images: torch.Tensor | None = None  # a joint step's generator output, graph kept

    @abc.abstractmethod
    def loss_terms(self, x: torch.Tensor, t_logits: torch.Tensor, t_features: torch.Tensor,
                   hooks: BatchNormHooks | None) -> dict[str, torch.Tensor]:
        """Unweighted terms for normalised images `x`; each name is a Config weight."""

    def after_step(self, terms: dict[str, torch.Tensor]) -> None:
        """Called after each generator step with its unweighted terms: a method whose
        objective depends on earlier steps (RDSKD) updates that state here."""

    def adversarial(self, x: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """-(student/teacher discrepancy) under the KD criterion: the generator seeks
        images the student has not yet learned to imitate (ZSKT, DFAD, DFQ)."""
        return -kd_loss(self.config.kd_criterion, self.student(x), t_logits, self.config.T)

    def synthesize(self) -> SynthesisResult:
        cfg = self.config
        self.teacher.eval()
        self.generator.train()
        params = list(self.generator.parameters())
        hooks_ctx = BatchNormHooks(self.teacher, features=False) if self.uses_bn_stats else nullcontext()
        with hooks_ctx as hooks, eval_mode(self.student):
            for _ in range(cfg.g_steps):
                z = torch.randn(cfg.synthesis_batch_size, cfg.latent_dim, device=self.device)
                images = self.generator(z)
                x = self.spec.normalize(images)
                t_logits, t_features = self.teacher(x, return_features=True)
                terms = self.loss_terms(x, t_logits, t_features, hooks)
                total = self.weighted_total(terms)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward(inputs=params)
                self.optimizer.step()
                self.after_step(terms)
        self.images_synthesized += len(images)
        return SynthesisResult(images.detach().clamp(0, 1).cpu(), self.report(terms, total))

    # -- one-stage rounds: begin_joint, a trainer's joint_step, end_joint ---------------

    def begin_joint(self) -> torch.Tensor:
        """The generator's forward pass of a joint step, on a fresh z and in train mode as in
        `synthesize`; its graph is kept for `end_joint`. Returns the images ([0, 1], detached)."""
        self.teacher.eval()
        self.generator.train()
        z = torch.randn(self.config.synthesis_batch_size, self.config.latent_dim, device=self.device)
        self._joint_images = self.generator(z)
        return self._joint_images.detach()

    def end_joint(self, grad_images: torch.Tensor, kd_loss: float, closes_round: bool = True) -> dict[str, float]:
        """The generator's backward pass and Adam step of a joint step. `grad_images`: d(the
        student's KD loss) / d(images), from the trainer's `joint_step`; `kd_loss`: that loss.
        The generator minimises adv * -kd, so its image gradient is the reversed one, -adv *
        grad_images. Reports the terms `synthesize` reports; `closes_round`: the round's last
        joint step, which counts its batch as synthesized (one batch per round, as `synthesize`)."""
        images, self._joint_images = self._joint_images, None
        weight = self.config.adv
        self.optimizer.zero_grad(set_to_none=True)
        images.backward(-weight * grad_images.to(images.device), inputs=list(self.generator.parameters()))
        self.optimizer.step()
        if closes_round:
            self.images_synthesized += len(images)
        adv = -float(kd_loss)
        return {"adv": adv, "total": weight * adv}

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        # Eval mode, like the benchmark code's final version: the generator's BN uses the
        # running statistics gathered during synthesis, so a KD batch does not depend on
        # its own batch statistics. synthesize() switches back to train mode.
        self.generator.eval()
        z = torch.randn(batch_size, self.config.latent_dim, device=self.device)
        return self.generator(z)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
