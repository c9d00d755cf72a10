"""Forward hooks on the teacher's BatchNorm2d layers.

DeepInversion's BN prior and CMI's contrastive features both read the input of every
BatchNorm2d. The hooks live only inside a `with BatchNormHooks(teacher) as hooks:` block,
so the KD steps of the loop (and other synthesizers sharing the teacher) pay nothing.
They only read: the teacher stays in eval mode and its running statistics never change.

A hook computes only what its method reads (`stats` and/or `features`). A method can also
send several views of its images through the teacher as one concatenated batch
(`hooks.views(n_first)`): in eval mode every image's path through the teacher is
independent of the others, so the outputs equal separate passes, and the hook takes the
batch statistics of the first view only and the instance features of every image. One
pass of 2B images costs less than two passes of B.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .losses import bn_loss


def channel_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (the normalisation a BN layer applies in
    training mode) of `x` (N, C, H, W) over N, H and W, from the sums of d = x - shift and
    of d * d: one pass, where `var` makes two. `shift` is a per-channel value near the mean
    (a BN layer's running mean), so E[d^2] - E[d]^2 does not cancel: mean 5 and std 0.1 keep
    a relative error of 4e-7, against 6e-4 unshifted. A channels_last tensor is summed as
    its (N*H*W, C) view, which this CPU reduces about 2x faster than dims (0, 2, 3)
    (docs/results/speed.md)."""
    channels = x.shape[1]
    if x.is_contiguous(memory_format=torch.channels_last):
        d, dims = x.permute(0, 2, 3, 1).reshape(-1, channels) - shift, (0,)
    else:
        d, dims = x - shift.view(1, -1, 1, 1), (0, 2, 3)
    mean_d = d.mean(dims)
    return mean_d + shift, (d * d).mean(dims) - mean_d * mean_d


def instance_means(x: torch.Tensor) -> torch.Tensor:
    """(N, C) per-image channel means of `x` (N, C, H, W); a channels_last tensor as its
    (N, H*W, C) view, which this CPU reduces faster than dims (2, 3) and to the same bits
    (docs/results/speed.md)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        n, c = x.shape[:2]
        return x.permute(0, 2, 3, 1).reshape(n, -1, c).mean(1)
    return x.mean(dim=(2, 3))


class BatchNormStatsHook:
    """Records, for the last forward through one BatchNorm2d, the distance of the batch
    statistics of its input (the first `owner.first` images) to the layer's running
    statistics (DeepInversion's R_feature), and the per-image channel means (CMI's
    instance features)."""

    def __init__(self, module: nn.BatchNorm2d, owner: "BatchNormHooks"):
        self.module, self.owner = module, owner
        self.r_feature: torch.Tensor | None = None
        self.instance_mean: torch.Tensor | None = None
        self.momentum: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) carried across batches
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last batch's, detached
        self._handle = module.register_forward_hook(self._record)

    def _record(self, module: nn.BatchNorm2d, inputs, output) -> None:
        owner = self.owner
        if owner.is_paused:  # a forward the method does not read (guided inversion's guide images)
            return
        x = inputs[0]
        self.instance_mean = instance_means(x) if owner.want_features else None
        if owner.want_stats:
            view = x if owner.first is None else x[:owner.first]
            mean, var = channel_moments(view, module.running_mean)
            self.last = (mean.detach(), var.detach())
            if self.momentum is not None:  # Fast-DFKD: statistics averaged over the batches so far
                rate = owner.momentum_rate
                mean = (1 - rate) * mean + rate * self.momentum[0]
                var = (1 - rate) * var + rate * self.momentum[1]
            self.r_feature = (torch.linalg.vector_norm(mean - module.running_mean)
                              + torch.linalg.vector_norm(var - module.running_var))
        else:
            self.r_feature = None

    def remove(self) -> None:
        self._handle.remove()


class BatchNormHooks:
    """One `BatchNormStatsHook` per BatchNorm2d of `model`, in module order.

    `stats`: compute the BN-statistics loss; `features`: the instance means."""

    def __init__(self, model: nn.Module, stats: bool = True, features: bool = True,
                 momentum: list | None = None, momentum_rate: float = 0.0):
        self.want_stats, self.want_features = stats, features
        self.first: int | None = None  # batch statistics over the first `first` images only
        self.is_paused = False  # True: forwards leave every recorded value as it was (`paused()`)
        self.momentum_rate = momentum_rate
        self.hooks = [BatchNormStatsHook(m, self) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the teacher has no BatchNorm2d layer to read statistics from")
        for hook, carried in zip(self.hooks, momentum or []):
            hook.momentum = carried

    def __enter__(self) -> "BatchNormHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __iter__(self):
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def views(self, first: int | None) -> "BatchNormHooks":
        """The next forwards carry concatenated views: statistics over the first `first`
        images (None: over the whole batch)."""
        self.first = first
        return self

    @contextmanager
    def paused(self):
        """Forwards inside this block are not recorded: the statistics, features and
        momentum read afterwards are those of the last forward before it."""
        self.is_paused = True
        try:
            yield self
        finally:
            self.is_paused = False

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def advance_momentum(self) -> list:
        """The statistics to carry to the next batch: m <- rate * m + (1 - rate) * the last
        batch's (the last batch's alone the first time). Fast-DFKD's BN-statistics momentum."""
        rate, out = self.momentum_rate, []
        for h in self.hooks:
            if h.momentum is None:
                out.append(h.last)
            else:
                out.append(tuple(rate * m + (1 - rate) * x for m, x in zip(h.momentum, h.last)))
        return out

    def bn_loss(self) -> torch.Tensor:
        return bn_loss(self.hooks)

    def features(self) -> torch.Tensor:
        """(B, sum of BN channels): instance means of every hooked layer, concatenated."""
        return torch.cat([h.instance_mean for h in self.hooks], dim=1)

    @property
    def feature_dim(self) -> int:
        return sum(h.module.num_features for h in self.hooks)
