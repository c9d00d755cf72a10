"""CMI: a freshly initialised generator and latent code per batch, optimised so the
images invert the teacher (BN statistics, target classes, adversarial to the student)
and are distinguishable from each other and from all earlier batches, measured by a
contrastive loss on the teacher's features."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_generator

from .augment import crop_and_flip, resized_crop_and_flip
from .base import BestIterate, SynthesisResult, eval_mode, place
from .budgets import inversion_budgets
from .config import BaseConfig, override, param, weight
from .guided import GuidedConfig, GuidedInversion
from .hooks import BatchNormHooks
from .inversion import ADV_TEMPERATURE
from .losses import agreement_masked_kl, info_nce
from .registry import register


@dataclass(frozen=True)
class CMIConfig(GuidedConfig):
    """Published preset (CIFAR-10, wrn40_2 -> wrn16_1): 200 generator steps per batch of
    256, one batch per 400 student steps on batches of 128; adv 0.5, bn 1, oh 1,
    cr 0.8, cr_T 0.1; memory bank 40960, 4096 negatives, head dim 256; KD at T=20."""

    kd_steps: int = override(BaseConfig, "kd_steps", 400)
    g_steps: int = override(BaseConfig, "g_steps", 200)
    batch_size: int = override(BaseConfig, "batch_size", 128)
    lr_g: float = override(BaseConfig, "lr_g", 1e-3)
    adv: float = weight(0.5, "negative student/teacher KL where their classes agree")
    bn: float = weight(1.0, "distance to the teacher's BN running statistics")
    oh: float = weight(1.0, "cross-entropy against sampled target classes")
    cr: float = weight(0.8, "contrastive (InfoNCE) loss between views and the bank")
    cr_T: float = param(0.1, gt=0, help="InfoNCE temperature")
    latent_dim: int = param(256, ge=1, help="generator latent size")
    bank_size: int = param(40960, ge=1, help="feature memory bank capacity")
    n_neg: int = param(4096, ge=1, help="negatives drawn from the bank per step")
    head_dim: int = param(256, ge=1, help="projection head output size")


class ProjectionHead(nn.Module):
    """Linear(D, D) - ReLU - Linear(D, head_dim), then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def contrastive_loss(head: ProjectionHead, local: torch.Tensor, global_: torch.Tensor,
                     cached_local: torch.Tensor, cached_global: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE over the current batch plus the bank's entries: each local view must find
    its own global view among all global views (current and cached). The global side is
    a detached target, as in the reference, so gradients reach the images through the
    local views. The current batch and the cached rows are averaged separately so that
    4096 cached rows do not dilute the batch's gradient."""
    n = len(local)
    proj = head(torch.cat([local, cached_local, global_, cached_global]))
    proj_local, proj_global = proj.chunk(2)
    per_row = info_nce(proj_local, proj_global.detach(), T)
    loss = per_row[:n].mean()
    if len(per_row) > n:
        loss = loss + per_row[n:].mean()
    return loss


@register("cmi")
class CMI(GuidedInversion):
    """Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation",
    IJCAI 2021.

    Memory-bank entries are [local, global] instance-mean features (2 x the sum of the
    teacher's BN channels), as in the reference: both halves of cached entries take
    part in the InfoNCE.
    """

    Config = CMIConfig
    display = "CMI"
    paper = "Fang et al., IJCAI 2021"
    optimizes = "BN, one-hot, agreement-masked adversarial KL, contrastive InfoNCE against a memory bank"
    budgets = inversion_budgets(cpu_g_steps=20, bank_size=64, n_neg=16)
    SEARCH_SPACE = {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "adv": {"type": "uniform", "low": 0.0, "high": 2.0},
        "bn": {"type": "loguniform", "low": 0.1, "high": 10.0},
        "oh": {"type": "uniform", "low": 0.0, "high": 2.0},
        "cr": {"type": "uniform", "low": 0.0, "high": 2.0},
        "cr_T": {"type": "loguniform", "low": 0.02, "high": 1.0},
    }

    @classmethod
    def store_capacity(cls, config):
        """The image pool grows without bound (as in the reference); the feature memory
        bank holds `bank_size` rows."""
        return None, config.bank_size

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        self.generator = place(create_generator(
            "generator", config.latent_dim, spec.image_size, spec.channels), self.device)
        hooks = BatchNormHooks(teacher)
        self.feature_dim = hooks.feature_dim  # sum of the teacher's BN channels
        hooks.remove()
        # The head persists across batches (only generator and z restart), with its
        # own Adam at lr_g and default betas, as in the reference.
        self.head = ProjectionHead(self.feature_dim, config.head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=config.lr_g)

    def cached_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Random [local | global] rows of the memory bank, split into halves."""
        cached = self.bank.negatives(self.config.n_neg).to(self.device)
        if len(cached) == 0:
            empty = torch.empty(0, self.feature_dim, device=self.device)
            return empty, empty
        if cached.shape[1] != 2 * self.feature_dim:
            raise ValueError(f"memory bank holds {cached.shape[1]}-d features; this teacher "
                             f"gives {2 * self.feature_dim} ([local, global])")
        return cached.chunk(2, dim=1)

    # One teacher pass over both views concatenated (statistics from the global view only,
    # features from both): the same terms and gradients as two passes, in less time
    # (tests/test_methods.py checks them to 1e-5; perf.step measures both).
    fused_views = True

    def loss_terms(self, images: torch.Tensor, targets: torch.Tensor, hooks: BatchNormHooks):
        """CMI's terms for one batch of generated images: (terms, local features, global
        features). Draws the two augmented views, then the memory bank's negatives."""
        spec, n = self.spec, len(images)
        global_view = spec.normalize(crop_and_flip(images))
        local_view = spec.normalize(resized_crop_and_flip(images))
        if self.fused_views:
            hooks.views(n)  # before the pass: statistics from the global view only
            t_logits, extra = self.teacher_pass(torch.cat([global_view, local_view]), targets)
            t_logits = t_logits[:n]
            bn = hooks.bn_loss()
            global_feat, local_feat = hooks.features().split(n)
        else:  # the plain per-view computation
            hooks.views(None)
            t_logits, extra = self.teacher_pass(global_view, targets)
            bn, global_feat = hooks.bn_loss(), hooks.features()
            hooks.want_stats = False  # the local view's batch statistics are never read
            self.teacher(local_view)
            hooks.want_stats, local_feat = True, hooks.features()
        terms = {"bn": bn, "oh": F.cross_entropy(t_logits, targets)}
        if self.uses_student:
            terms["adv"] = agreement_masked_kl(self.student(global_view), t_logits, ADV_TEMPERATURE)
        cached_local, cached_global = self.cached_features()
        terms["cr"] = contrastive_loss(self.head, local_feat, global_feat, cached_local, cached_global,
                                       self.config.cr_T)
        terms.update(extra)  # the guided term (methods/guided.py), when on
        return terms, local_feat, global_feat

    def synthesize(self) -> SynthesisResult:
        cfg = self.config
        self.check_guide()
        self.teacher.eval()
        targets = self.random_targets()
        # A new starting point for every batch: fresh generator weights and latent code.
        self.generator.reinitialize()
        self.generator.train()
        z = torch.randn(cfg.synthesis_batch_size, cfg.latent_dim, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}],
                                     lr=cfg.lr_g, betas=(0.5, 0.999))
        params = [*self.generator.parameters(), z, *self.head.parameters()]
        best = BestIterate()
        with BatchNormHooks(self.teacher) as hooks, eval_mode(self.student):
            for _ in range(cfg.g_steps):
                images = self.generator(z)
                terms, local_feat, global_feat = self.loss_terms(images, targets, hooks)
                total = self.weighted_total(terms)
                best.offer(terms, total, images, torch.cat([local_feat, global_feat], dim=1))
                optimizer.zero_grad(set_to_none=True)
                self.head_optimizer.zero_grad(set_to_none=True)
                total.backward(inputs=params)
                optimizer.step()
                self.head_optimizer.step()
                self.after_step(hooks)
        (best_images, best_features), report = best.result()
        images = self.keep(best_images, targets, best_features)
        return SynthesisResult(images, self.round_report(report))

    def state_dict(self) -> dict:
        # The generator restarts every batch, so its weights matter only for inspection;
        # the head and its optimizer carry state across batches.
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "head": self.head.state_dict(), "head_optimizer": self.head_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
