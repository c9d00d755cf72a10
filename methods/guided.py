"""Guided model inversion (issue #15): a few real or condensed images per class (a guide set,
orchestrator/core/guides.py) steer an inversion method's synthesis through a class-conditional
discriminator in the teacher's penultimate feature space, after Binici et al., "Condensed
Sample-Guided Model Inversion for Knowledge Distillation", arXiv:2408.13850, 2024.

CMI, DeepInversion and Fast-DFKD subclass `GuidedInversion` and gain two config fields
(`GuidedConfig`): `guide`, the weight of the guided term (0 = off, the default: the method is
then exactly what it was, draw for draw), and `lr_d`, the discriminator's Adam learning rate.
With guide > 0, every synthesis step

    h_f = f_T(x_f)                     teacher penultimate features of the synthesized view
    L_guide = softplus(-D(h_f, y))     the generator's term (non-saturating), y the synthesis targets
    ... the method's own step on its weighted total, L_guide included ...
    x_r, y_r = A(guide images)         the dataset's crop and flip, min(N, synthesis batch) images
    L_D = mean softplus(-D(f_T(x_r), y_r)) + mean softplus(D(h_f.detach(), y))   one Adam step of D

with the projection discriminator D(h, y) = w^T phi(h) + <E[y], phi(h)> (`FeatureDiscriminator`).
docs/methods.md ("Guided inversion") says what the paper states and what is our choice.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BaseConfig, param, weight
from .inversion import InversionSynthesizer, augment_pool_batch

DISC_HIDDEN = 256  # width of the discriminator's MLP and of its class embedding
DISC_BETAS = (0.5, 0.999)  # Adam's betas for the discriminator, the usual GAN setting


@dataclass(frozen=True)
class GuidedConfig(BaseConfig):
    """The fields of a method that can be guided by a guide set (`--guide KIND:K`)."""

    guide: float = weight(0.0, "non-saturating adversarial loss of a class-conditional feature discriminator "
                               "trained on the guide set (0: off)", late=True)
    lr_d: float = param(1e-3, gt=0, late=True, help="learning rate of the guide discriminator (Adam)")

    def row_suffixes(self) -> list[str]:
        return ([" +guide"] if self.guide > 0 else []) + super().row_suffixes()

    def guide_uses(self) -> list[str]:
        own = [f"guide={self.guide} weights the guided discriminator term"] if self.guide > 0 else []
        return own + super().guide_uses()


class FeatureDiscriminator(nn.Module):
    """A projection discriminator (Miyato & Koyama, ICLR 2018) on feature vectors:
    D(h, y) = w^T phi(h) + b + <E[y], phi(h)>, phi a two-layer MLP with LeakyReLU(0.2)."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = DISC_HIDDEN):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(feature_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.linear = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden)
        nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.phi(features)
        return self.linear(p).squeeze(1) + (self.embed(labels) * p).sum(1)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's non-saturating GAN loss: -log sigmoid(D(real)) - log(1 - sigmoid(D(fake)))."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The synthesizer's side: -log sigmoid(D(fake)), lowest when D takes its images for guide images."""
    return F.softplus(-d_fake).mean()


def draw_guide(images: torch.Tensor, labels: torch.Tensor, n: int, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """n guide images ([0, 1]) through the dataset's training augmentation (crop and flip, as
    KD reads an inversion pool), with their labels: distinct images when the set has n, else
    drawn with replacement. Draws from torch's global generator."""
    size = len(images)
    index = torch.randperm(size)[:n] if n <= size else torch.randint(0, size, (n,))
    index = index.to(images.device)
    return augment_pool_batch(images[index], spec), labels[index]


class GuidedInversion(InversionSynthesizer):
    """An inversion method with the guided term. A subclass routes its teacher pass on the
    synthesized batch through `teacher_pass` (which adds the "guide" term) and calls
    `after_step` after each optimisation step (which trains the discriminator) and
    `round_report` on the kept iterate's report (which adds "disc", the round's mean
    discriminator loss). With guide = 0 none of them computes or draws anything."""

    GUIDE_SEARCH_SPACE = {
        "guide": {"type": "loguniform", "low": 0.01, "high": 2.0},
        "lr_d": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    }

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        self.discriminator: FeatureDiscriminator | None = None
        self._fake: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's detached features, targets
        self._disc_losses: list[torch.Tensor] = []  # read as floats once per round: no sync per step
        if self.guided:  # built only when used: a plain config draws nothing more than before
            self.discriminator = FeatureDiscriminator(teacher.num_features, spec.num_classes).to(self.device)
            self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=DISC_BETAS)

    @property
    def guided(self) -> bool:
        return self.config.guide > 0

    def teacher_pass(self, x, targets):
        if not self.guided:
            return super().teacher_pass(x, targets)
        logits, features = self.teacher(x, return_features=True)
        features = features[:len(targets)]  # the synthesized view (CMI passes two views at once)
        self._fake = (features.detach(), targets)
        return logits, {"guide": generator_loss(self.discriminator(features, targets))}

    def after_step(self, hooks) -> None:
        if self.guided:
            self._disc_losses.append(self.discriminator_step(hooks))

    def discriminator_step(self, hooks=None) -> torch.Tensor:
        """One Adam step of D: guide images (augmented) are real, the last step's synthesized
        features (detached) fake. The guide images' teacher pass is hidden from `hooks`, so
        the method's BN statistics, features and momentum stay those of its own batch."""
        fake, fake_labels = self._fake
        n = min(len(self.guide_images), self.config.synthesis_batch_size)
        real_images, real_labels = draw_guide(self.guide_images, self.guide_labels, n, self.spec)
        with torch.no_grad(), (hooks.paused() if hooks is not None else nullcontext()):
            _, real = self.teacher(self.spec.normalize(real_images), return_features=True)
        loss = discriminator_loss(self.discriminator(real, real_labels), self.discriminator(fake, fake_labels))
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.discriminator.parameters()))
        self.d_optimizer.step()
        return loss.detach()

    def round_report(self, report: dict[str, float]) -> dict[str, float]:
        if not self._disc_losses:
            return report
        disc, self._disc_losses = sum(x.item() for x in self._disc_losses) / len(self._disc_losses), []
        return {**report, "disc": disc}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.guided:  # a plain config's state stays what it always was
            state["discriminator"] = self.discriminator.state_dict()
            state["d_optimizer"] = self.d_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.guided:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
