"""Shared machinery of the inversion methods (DeepInversion, CMI): each round optimises
one batch from scratch, keeps its lowest-loss iterate in the instance bank, and KD steps
sample the whole pool of kept batches with the dataset's training augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import crop_and_flip, random_crop_with_padding, random_hflip
from .bank import InstanceBank, from_uint8, to_uint8
from .base import Synthesizer
from .losses import agreement_masked_kl

# Adversarial terms are scored with KL at T=1, whatever the KD temperature (as CMI's reference).
ADV_TEMPERATURE = 1.0


def augment_pool_batch(x: torch.Tensor, spec) -> torch.Tensor:
    """How KD reads an inversion pool: the reference reads it back through the dataset's
    training transforms (CIFAR: random crop with padding 4, horizontal flip); the same,
    one draw per image."""
    if spec.crop_padding:
        x = random_crop_with_padding(x, spec.crop_padding)
    if spec.hflip:
        x = random_hflip(x)
    return x


class InversionSynthesizer(Synthesizer):
    kind = "inversion"
    fresh_kd_batches = False  # KD samples the whole bank of kept batches
    kd_view = staticmethod(augment_pool_batch)

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        if self.bank is None:
            self.bank = InstanceBank(*self.store_capacity(config))

    def keep(self, images: torch.Tensor, targets: torch.Tensor,
             features: torch.Tensor | None = None) -> torch.Tensor:
        """Push a kept batch (float [0, 1]) to the bank; returns it on the CPU."""
        images = images.detach().clamp(0, 1).cpu()
        self.bank.add(to_uint8(images), targets.cpu(),
                      None if features is None else features.detach().cpu())
        self.images_synthesized += len(images)
        return images

    def generated_batch_terms(self, images: torch.Tensor, targets: torch.Tensor, hooks,
                              adversarial: bool) -> dict[str, torch.Tensor]:
        """The terms Fast-DFKD and NAYER minimise on a generated batch, seen through the
        dataset's crop and flip: BN statistics, one-hot, and (when `adversarial`) the
        agreement-masked adversarial KL."""
        x = self.spec.normalize(crop_and_flip(images))
        t_logits, extra = self.teacher_pass(x, targets)
        terms = {"bn": hooks.bn_loss(), "oh": F.cross_entropy(t_logits, targets)}
        if adversarial:
            terms["adv"] = agreement_masked_kl(self.student(x), t_logits, ADV_TEMPERATURE)
        return {**terms, **extra}

    def teacher_pass(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The teacher's logits on normalised `x` (whose first len(targets) images have the
        synthesis targets), and any extra terms read from the same pass: none here; guided
        inversion (methods/guided.py) adds its discriminator term. Extra terms go last in a
        method's terms, so the weighted total of the others is summed as before."""
        return self.teacher(x), {}

    def after_step(self, hooks) -> None:
        """Called after each optimisation step of a synthesis round (guided inversion trains
        its discriminator here)."""

    def round_report(self, report: dict[str, float]) -> dict[str, float]:
        """The round's report from its kept iterate's (guided inversion adds its own)."""
        return report

    @staticmethod
    def flat_statistics(statistics: list | None) -> list:
        """BN-statistics momentum [(mean, var), ...] as a flat list of tensors (state files)."""
        return [] if statistics is None else [t for pair in statistics for t in pair]

    @staticmethod
    def paired_statistics(flat: list) -> list | None:
        flat = list(flat)
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)] or None

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.kd_view(from_uint8(self.bank.sample(batch_size)).to(self.device), self.spec)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"])
