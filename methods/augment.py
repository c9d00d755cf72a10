"""Differentiable per-image augmentation on any device.

Every function draws its randomness per image (not once per batch) from torch's global
generator, so a seeded run is reproducible, and gradients flow back to the pixels (crops
and rolls are index gathers; the resized crop is a bilinear `grid_sample`). Inputs are
(B, C, H, W) in [0, 1]; padding is black, like torchvision's RandomCrop(padding=4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]] for (B, H') rows, (B, W') cols."""
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    # Advanced indices split by a slice put the broadcast dims first: (B, H', W', C).
    return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_crop_with_padding(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to the input size at a random offset."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    return _gather(padded, rows, cols)


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_resized_crop(x: torch.Tensor, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random box (area fraction in `scale`, aspect ratio in `ratio`, log-uniform)
    and resize it to the input size with bilinear sampling.

    torchvision retries a draw that does not fit and falls back to a centre crop; here
    an over-wide or over-tall box is clipped to the image instead, which keeps every draw
    vectorised (it only happens near scale 1 with an extreme ratio).
    """
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    area = torch.empty(n, device=dev, dtype=dt).uniform_(*scale)
    log_r = torch.empty(n, device=dev, dtype=dt).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = log_r.exp()
    # Box sides as fractions of the image width and height.
    bw = torch.sqrt(area * r).clamp(max=1.0)
    bh = torch.sqrt(area / r).clamp(max=1.0)
    # Box centre, uniform over positions that keep the box inside the image, in [-1, 1].
    cx = (torch.rand(n, device=dev, dtype=dt) * 2 - 1) * (1 - bw)
    cy = (torch.rand(n, device=dev, dtype=dt) * 2 - 1) * (1 - bh)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = bw
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_roll(x: torch.Tensor, max_shift_h: int, max_shift_w: int) -> torch.Tensor:
    """Circularly shift each image by its own offsets in [-max, max] (DeepInversion's jitter)."""
    n, _, h, w = x.shape
    dy = torch.randint(-max_shift_h, max_shift_h + 1, (n, 1), device=x.device)
    dx = torch.randint(-max_shift_w, max_shift_w + 1, (n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) - dy) % h
    cols = (torch.arange(w, device=x.device) - dx) % w
    return _gather(x, rows, cols)


def jitter_and_flip(x: torch.Tensor, lim: float = 1 / 8) -> torch.Tensor:
    """DeepInversion's augmentation: a random roll of up to `lim` of each side, then a
    random horizontal flip. Works on any value range (DeepInv applies it to normalised
    pixels), since a roll adds no padding."""
    h, w = x.shape[-2:]
    return random_hflip(random_roll(x, int(h * lim), int(w * lim)))


def crop_and_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The CIFAR training transform: random crop with padding, then horizontal flip."""
    return random_hflip(random_crop_with_padding(x, padding))


def resized_crop_and_flip(x: torch.Tensor, scale=(0.25, 1.0)) -> torch.Tensor:
    """CMI's local view."""
    return random_hflip(random_resized_crop(x, scale))
