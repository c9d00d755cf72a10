"""Dataset condensation by distribution matching (DM), the maker of `condensed:K` guide sets.

Bo Zhao, Hakan Bilen, "Dataset Condensation with Distribution Matching", WACV 2023
(arXiv:2110.04181). K learnable images per class, started from real images of the class,
are moved so that their mean embedding matches the mean embedding of a real batch of the
same class. The embedding is a ConvNet drawn at random again in every iteration and never
trained, so there is no inner training loop (no bi-level optimisation):

    L = sum_c || mean_i psi(A(x_real_ci)) - mean_j psi(A(s_cj)) ||^2
    psi = a fresh random ConvNet; A = one DSA transformation, the same draw for both sides

Images live in the dataset's normalised space, as in the paper; SGD, lr 1.0, momentum 0.5.
Where this differs from the paper (CPU budget, projection to [0, 1]) is listed on
`DMConfig` and in docs/methods.md ("Guide sets"). Plain PyTorch: every random draw comes
from one `torch.Generator` seeded by the caller, so a seed gives the same set.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.datasets import DatasetSpec, ImageSet

# The paper's differentiable Siamese augmentation (DSA) families; each iteration draws one
# family per class, and one parameter draw serves the real and the synthetic batch.
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DMConfig:
    """Defaults are this project's CPU budget. The paper (and the authors' code) use
    iterations 20000 and batch_real 256; lr_img, momentum, width, depth and DSA are theirs.
    One iteration at width 128 with 10 classes x 32 real images costs about 2 CPU-seconds,
    hence 60 iterations and 32 real images by default: Fashion-MNIST, K = 10 took 223 s
    on this project's 2-core machine while a benchmark and other jobs ran (load ~7), and
    its loss had levelled off by iteration 50 (docs/methods.md, "Guide sets")."""

    iterations: int = 60
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 32
    width: int = 128
    depth: int = 3
    dsa: bool = True

    def check(self) -> None:
        from orchestrator.core.errors import UsageError

        for name in ("iterations", "batch_real", "width", "depth"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.lr_img > 0:
            raise UsageError(f"--lr-img {self.lr_img}: must be positive")


# --------------------------------------------------------------------- the ConvNet
def random_convnet(channels: int, width: int, depth: int, generator: torch.Generator) -> list[tuple]:
    """Weights of the paper's ConvNet feature extractor: `depth` blocks of [conv3x3(width),
    instance norm, ReLU, avg pool 2]. Drawn as PyTorch's default Conv2d init does
    (kaiming_uniform with a=sqrt(5) is U(+-1/sqrt(fan_in)); the bias the same), but from
    `generator`, so the draw is reproducible and leaves torch's global stream alone."""
    params, c_in = [], channels
    for _ in range(depth):
        bound = 1.0 / math.sqrt(c_in * 9)
        weight = (torch.rand(width, c_in, 3, 3, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(width, generator=generator) * 2 - 1) * bound
        params.append((weight, bias))
        c_in = width
    return params


def embed(x: torch.Tensor, params: list[tuple]) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, D) flattened features (D = 2048 at 32 x 32)."""
    for weight, bias in params:
        x = F.conv2d(x, weight, bias, padding=1)
        # GroupNorm with one group per channel is instance norm; its affine part is at its
        # init (gain 1, shift 0) in a never-trained net, so it is left out.
        x = F.group_norm(x, x.shape[1])
        x = F.avg_pool2d(F.relu(x), 2)
    return x.flatten(1)


# ------------------------------------------------------------------------ DSA
def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)  # zeros outside: the dataset's mean colour


def draw_dsa(spec: DatasetSpec, size: int, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """One DSA transformation with its parameters drawn once: calling it on the real and
    on the synthetic batch applies the same transformation to every image of both, which
    is what makes the augmentation "Siamese" (Zhao & Bilen, ICML 2021). Strengths are the
    authors': brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5], shift up to 1/8
    of the side, a cutout of half the side, scale x[1/1.2, 1.2] per axis, rotation +-15 deg.
    Flip is skipped for datasets that forbid it (MNIST digits)."""
    ops = [op for op in DSA_OPS if op != "flip" or spec.hflip]
    op = ops[int(torch.randint(len(ops), (1,), generator=generator))]
    if op == "color":
        bright, sat, contrast = _rand(generator) - 0.5, 2 * _rand(generator), _rand(generator) + 0.5

        def color(x):
            x = x + bright
            if x.shape[1] == 3:  # saturation is undefined for one channel
                gray = x.mean(1, keepdim=True)
                x = (x - gray) * sat + gray
            level = x.mean((1, 2, 3), keepdim=True)
            return (x - level) * contrast + level
        return color
    if op == "crop":
        pad = int(size * 0.125 + 0.5)
        dy, dx = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=generator))
        return lambda x: F.pad(x, (pad, pad, pad, pad))[:, :, pad + dy:pad + dy + size, pad + dx:pad + dx + size]
    if op == "cutout":
        half = int(size * 0.5 / 2 + 0.5)
        cy, cx = (int(v) for v in torch.randint(0, size, (2,), generator=generator))
        mask = torch.ones(1, 1, size, size)
        mask[:, :, max(cy - half, 0):cy + half, max(cx - half, 0):cx + half] = 0
        return lambda x: x * mask
    if op == "flip":
        flip = _rand(generator) < 0.5
        return lambda x: x.flip(3) if flip else x
    if op == "scale":
        lo = 1 / 1.2
        sx, sy = lo + (1.2 - lo) * _rand(generator), lo + (1.2 - lo) * _rand(generator)
        theta = torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]])
        return lambda x: _affine(x, theta)
    angle = (_rand(generator) - 0.5) * 2 * math.radians(15.0)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]])
    return lambda x: _affine(x, theta)


# ------------------------------------------------------------------------- loss
def class_means(batches: list[torch.Tensor], params: list[tuple]) -> torch.Tensor:
    """(classes, D): the mean embedding of each class's batch, all classes in one pass
    (instance norm treats every image on its own, so batching them changes nothing)."""
    emb = embed(torch.cat(batches), params).split([len(b) for b in batches])
    return torch.stack([e.mean(0) for e in emb])


def dm_loss(syn: list[torch.Tensor], real: list[torch.Tensor], params: list[tuple],
            augments: list[Callable] | None = None) -> torch.Tensor:
    """sum over classes of the squared distance between the mean embeddings of the real and
    the synthetic images (the paper's loss for a ConvNet with instance norm). The real side
    carries no gradient."""
    if augments is not None:
        syn = [a(s) for a, s in zip(augments, syn)]
        real = [a(r) for a, r in zip(augments, real)]
    with torch.no_grad():
        real_means = class_means(real, params)
    return ((real_means - class_means(syn, params)) ** 2).sum()


# --------------------------------------------------------------------- condense
class Normaliser:
    def __init__(self, spec: DatasetSpec):
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)
        self.lo, self.hi = (0 - self.mean) / self.std, (1 - self.mean) / self.std

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255 - self.mean) / self.std

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).clamp(0, 1)


def class_indices(train: ImageSet) -> list[torch.Tensor]:
    return [torch.nonzero(train.labels == c).flatten() for c in range(train.spec.num_classes)]


def real_batches(train: ImageSet, by_class: list[torch.Tensor], n: int, norm: Normaliser,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Up to `n` distinct random real images of every class, normalised."""
    return [norm(train.images[idx[torch.randperm(len(idx), generator=generator)[:n]]]) for idx in by_class]


@dataclass
class Condensed:
    images: torch.Tensor  # float32 in [0, 1], (num_classes * k, C, H, W), class-major
    labels: torch.Tensor  # int64
    losses: list[float]  # the DM loss per class of every iteration (random net and batch)
    seconds: float


def condense(train: ImageSet, init_indices: torch.Tensor, k: int, seed: int, config: DMConfig = DMConfig(),
             progress: bool = True) -> Condensed:
    """Runs DM from the real images `init_indices` (class-major, k per class)."""
    from tqdm import tqdm

    spec, norm = train.spec, Normaliser(train.spec)
    generator = torch.Generator().manual_seed(seed)
    by_class = class_indices(train)
    syn = norm(train.images[init_indices]).requires_grad_(True)
    optimiser = torch.optim.SGD([syn], lr=config.lr_img, momentum=config.momentum)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(config.iterations), desc="condensing", unit="it", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        params = random_convnet(spec.channels, config.width, config.depth, generator)
        real = real_batches(train, by_class, config.batch_real, norm, generator)
        augments = [draw_dsa(spec, spec.image_size, generator) for _ in by_class] if config.dsa else None
        loss = dm_loss(list(syn.split(k)), real, params, augments)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            # Ours: projected onto valid images, so the stored set is exactly the one whose
            # loss was reported (the paper leaves the pixels unbounded, clipping for display).
            syn.copy_(torch.maximum(torch.minimum(syn, norm.hi), norm.lo))
        losses.append(loss.item() / spec.num_classes)
        bar.set_postfix(loss_per_class=f"{losses[-1]:.4g}")
    bar.close()
    labels = torch.arange(spec.num_classes).repeat_interleave(k)
    return Condensed(norm.to_unit(syn.detach()).contiguous(), labels, losses, time.perf_counter() - start)


@torch.no_grad()
def fixed_dm_loss(sets: list[torch.Tensor], labels: torch.Tensor, train: ImageSet, config: DMConfig = DMConfig(),
                  n_nets: int = 2, per_class: int = 64, seed: int = 12345) -> list[float]:
    """The DM loss per class of each image set in `sets` (float [0, 1], same labels), on the
    same `n_nets` random ConvNets and the same `per_class` real images per class, without
    augmentation. The training loss is drawn afresh every iteration and so is noisy; this
    one compares sets (before/after) on equal terms."""
    spec, norm = train.spec, Normaliser(train.spec)
    generator = torch.Generator().manual_seed(seed)
    real = real_batches(train, class_indices(train), per_class, norm, generator)
    out = [0.0] * len(sets)
    for _ in range(n_nets):
        params = random_convnet(spec.channels, config.width, config.depth, generator)
        real_means = class_means(real, params)
        for i, images in enumerate(sets):
            x = (images - norm.mean) / norm.std
            syn_means = class_means([x[labels == c] for c in range(spec.num_classes)], params)
            out[i] += ((real_means - syn_means) ** 2).sum().item() / spec.num_classes / n_nets
    return out
