"""Loss terms shared by the DFKD methods (and `kd_loss`, shared with the KD loop).

Every function takes logits or features and returns a scalar tensor unless said
otherwise. Sign conventions: each function returns the quantity the synthesizer
*minimises*, so maximised objectives (class balance, activation) come back negated.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0,
           reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton et al. scaling keeps gradients at
    the same size across temperatures). `reduction`: "batchmean" -> scalar,
    "per_sample" -> (B,) sums over classes."""
    log_q = F.log_softmax(student_logits / T, dim=1)
    log_p = F.log_softmax(teacher_logits / T, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1) * (T * T)
    if reduction == "per_sample":
        return per_sample
    if reduction == "batchmean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'batchmean' or 'per_sample', got {reduction!r}")


def js_div(p_logits: torch.Tensor, q_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(p/T) and softmax(q/T), batch mean.

    Computed in log space (log M = logsumexp of the two) so no probability clamp is
    needed; the public DeepInversion code clamps to [0.01, 0.99] for the same reason.
    """
    log_p = F.log_softmax(p_logits / T, dim=1)
    log_q = F.log_softmax(q_logits / T, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def _l1_logits(student_logits, teacher_logits, T):
    # DFAD's criterion: mean absolute difference of the raw logits (T plays no part).
    return F.l1_loss(student_logits, teacher_logits)


KD_CRITERIA: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": lambda s, t, T: kl_div(s, t, T),
    "l1": _l1_logits,
}

# Representation terms a criterion may add to its logit part ("kl+crd"); the student's side
# computes them (methods/crd.py: KDObjective), since they need features and trainable heads.
KD_EXTRAS = ("crd",)

# Every valid `kd_criterion`: a logit criterion, optionally "+" a representation term.
KD_CRITERION_CHOICES = (*KD_CRITERIA, *(f"{base}+{extra}" for extra in KD_EXTRAS for base in KD_CRITERIA))


def split_criterion(criterion: str) -> tuple[str, tuple[str, ...]]:
    """"kl+crd" -> ("kl", ("crd",)); raises ValueError naming the valid criteria."""
    base, *extras = criterion.split("+")
    if base not in KD_CRITERIA or any(e not in KD_EXTRAS for e in extras) or len(set(extras)) != len(extras):
        raise ValueError(f"unknown kd criterion {criterion!r}; known: {', '.join(KD_CRITERION_CHOICES)}")
    return base, tuple(extras)


def kd_loss(criterion: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            T: float) -> torch.Tensor:
    """The logit part of the student's distillation loss ("kl" at temperature T, or "l1"
    on logits; for "kl+crd" the "kl" part). The generator methods' adversarial term is its
    negative: a generator has no embedding heads, so it plays against the logit part only."""
    base, _ = split_criterion(criterion)
    return KD_CRITERIA[base](student_logits, teacher_logits, T)


def exp_increment_penalty(loss: torch.Tensor, reference: float | torch.Tensor) -> torch.Tensor:
    """RDSKD's damping of loss fluctuations: exp(loss - reference), `reference` a constant
    (an earlier value of the same loss). Its gradient is exp(loss - reference) * d loss: a
    loss that rose above its reference is pushed down harder (factor > 1), one that fell
    below it is pushed less (factor < 1), and at the reference the gradient is the plain
    loss's (factor 1)."""
    reference = torch.as_tensor(reference, dtype=loss.dtype, device=loss.device).detach()
    return torch.exp(loss - reference)


def pair_diversity_loss(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """RDSKD's inter-sample diversity term, as its authors' code computes it: the batch's
    first and second halves (independent latent draws) are paired, and the loss is
    ||softmax(t_2) - softmax(t_1)||_F / ||x_2 - x_1||_F over the whole halves (one ratio,
    not one per pair). Minimising it moves the two halves' images apart, relative to how far
    apart the teacher's predictions on them are. An odd batch leaves its last image out."""
    half = len(x) // 2
    if half == 0:
        return x.new_zeros(())
    p = F.softmax(logits, dim=1)
    image_gap = (x[half:2 * half] - x[:half]).flatten().norm()
    output_gap = (p[half:2 * half] - p[:half]).flatten().norm()
    # The authors' 1 / (image_gap / output_gap + 1e-20): the same ratio, kept finite here
    # when two halves coincide (a collapsed generator) instead of dividing by zero.
    return output_gap / image_gap.clamp_min(1e-12)


def bn_loss(hooks: Iterable) -> torch.Tensor:
    """DeepInversion's feature-statistics prior: sum over BN layers of
    ||mu_batch - mu_running||_2 + ||var_batch - var_running||_2 (see hooks.py)."""
    return sum(h.r_feature for h in hooks)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Image smoothness prior over horizontal, vertical and both diagonal neighbours: the
    sum over the four directions of the mean absolute difference (the variant the CMI
    benchmark code's DeepInversion uses; it does not grow with batch or image size, which
    is what its tv weight of 0.001 is calibrated for)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:],
             x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
             x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(d.abs().mean() for d in diffs)


def class_balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """sum_c p_c log p_c of the batch-mean softmax: minimising it maximises the entropy
    of the predicted class distribution (DAFL's information-entropy loss)."""
    p = F.softmax(logits, dim=1).mean(dim=0)
    return (p * torch.log(p)).sum()


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL: real images excite the teacher's penultimate features strongly."""
    return -features.abs().mean()


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row InfoNCE: row i of `anchors` must pick row i of `positives` among all rows.

    Both inputs are L2-normalised (N, D); returns the (N,) cross-entropies of the cosine
    similarity logits / temperature, so the caller decides how to average (CMI averages
    the current batch and the memory-bank rows separately).
    """
    logits = anchors @ positives.t() / temperature
    labels = torch.arange(len(anchors), device=anchors.device)
    return F.cross_entropy(logits, labels, reduction="none")


def agreement_masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """CMI's adversarial term: the negative student/teacher KL, counted only on images
    where both predict the same class, so the images push the student away from the
    teacher without changing the class they show (also Fast-DFKD's and NAYER's)."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_div(student_logits, teacher_logits, T, reduction="per_sample") * agree).mean()

