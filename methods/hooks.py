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

While the hooks live, an eval-mode BatchNorm2d runs as one autograd node (`ObservedBatchNorm`)
that returns its output and what the hook reads, and whose backward writes the input's whole
gradient (through the normalisation, the statistics and the features) in one and a half passes
over the activation. Read the usual way (a forward hook and autograd through slices, means and
products) the same gradient took about eight passes, each a separate tensor added to the next:
at 32 px this CPU is memory-bound, so that was a quarter of a CMI step (docs/results/speed.md,
session 11). `BatchNormHooks(..., fused=False)` keeps the plain autograd path; tests compare the
two to 1e-5.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .losses import bn_loss


def _moments_of_rows(rows: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of the columns of `rows` (M, C), from the sums of d = rows - shift."""
    d = rows - shift
    mean_d = d.mean(0)
    return mean_d + shift, (d * d).mean(0) - mean_d * mean_d


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
        return _moments_of_rows(x.permute(0, 2, 3, 1).reshape(-1, channels), shift)
    d = x - shift.view(1, -1, 1, 1)
    mean_d = d.mean((0, 2, 3))
    return mean_d + shift, (d * d).mean((0, 2, 3)) - mean_d * mean_d


def instance_means(x: torch.Tensor) -> torch.Tensor:
    """(N, C) per-image channel means of `x` (N, C, H, W); a channels_last tensor as its
    (N, H*W, C) view, which this CPU reduces faster than dims (2, 3) and to the same bits
    (docs/results/speed.md)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        n, c = x.shape[:2]
        return x.permute(0, 2, 3, 1).reshape(n, -1, c).mean(1)
    return x.mean(dim=(2, 3))


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) view of (N, C, H, W): contiguous when `x` is channels_last."""
    return x.permute(0, 2, 3, 1)


class ObservedBatchNorm(torch.autograd.Function):
    """An eval-mode BatchNorm2d, y = x * scale + offset per channel, that also returns what
    the hooks read from its input x: the mean and biased variance over the first `first`
    images (None unless `stats`) and the per-image channel means (None unless `features`).

    Backward, with g_y, g_mean, g_var, g_inst the gradients reaching y and the three
    statistics, M = first * H * W and mu the returned mean:

        dx = g_y * scale + g_inst / (H * W)                       every image
           + g_mean / M + 2 * g_var * (x - mu) / M                the first `first` images

    written as one addcmul over the activation, plus one over the first images. The running
    statistics and the affine parameters are constants of an eval-mode layer; the parameters
    get their gradients too when they require them."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, first: int,
                stats: bool, features: bool):
        ctx.set_materialize_grads(False)  # a statistic nobody read sends no gradient
        n_images, channels = x.shape[:2]
        first = min(first, n_images)
        invstd = 1 / torch.sqrt(running_var + eps)
        scale = invstd if weight is None else weight * invstd
        offset = -running_mean * scale if bias is None else bias - running_mean * scale
        xv = _nhwc(x)
        y = torch.addcmul(offset, xv, scale).permute(0, 3, 1, 2)
        mean = var = inst = None
        if stats:
            mean, var = _moments_of_rows(xv[:first].reshape(-1, channels), running_mean)
        if features:
            inst = instance_means(x)
        ctx.save_for_backward(x, scale, invstd, running_mean, mean)
        ctx.first = first
        return y, mean, var, inst

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var, g_inst):
        x, scale, invstd, running_mean, mean = ctx.saved_tensors
        n_images, channels, height, width = x.shape
        first, pixels = ctx.first, height * width
        xv = _nhwc(x)
        constant = x.new_zeros(n_images, channels)  # per image and channel, added at every pixel
        if g_inst is not None:
            constant += g_inst / pixels
        slope = None
        if g_mean is not None or g_var is not None:
            rows = first * pixels
            if g_mean is not None:
                constant[:first] += g_mean / rows
            if g_var is not None:
                slope = 2 * g_var / rows
                constant[:first] -= slope * mean
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            constant = constant.view(n_images, 1, 1, channels)
            if g_y is not None:
                dx = torch.addcmul(constant, _nhwc(g_y), scale)
            else:
                dx = constant.expand(n_images, height, width, channels).contiguous()
            if slope is not None:
                dx[:first].addcmul_(xv[:first], slope)
            grad_x = dx.permute(0, 3, 1, 2)
        if g_y is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            gv = _nhwc(g_y)
            if ctx.needs_input_grad[1]:
                grad_weight = (gv * (xv - running_mean)).sum((0, 1, 2)) * invstd
            if ctx.needs_input_grad[2]:
                grad_bias = gv.sum((0, 1, 2))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


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
        # The layer's forward is replaced while the hook lives (an instance attribute, deleted
        # by remove()): a forward hook could read the input but not change the backward.
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} already has its forward replaced (hooked twice?)")
        module.forward = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        module, owner = self.module, self.owner
        plain = type(module).forward
        if owner.is_paused:  # a forward the method does not read (guided inversion's guide images)
            return plain(module, x)
        if (module.training or module.running_mean is None or not owner.fused or x.dim() != 4
                or x.dtype != module.running_mean.dtype):
            # Batch statistics normalise the input, or mixed precision, or the plain path was
            # asked for: the layer as it is, and the statistics through autograd.
            output = plain(module, x)
            self._record(x)
            return output
        first = len(x) if owner.first is None else owner.first
        y, mean, var, self.instance_mean = ObservedBatchNorm.apply(
            x, module.weight, module.bias, module.running_mean, module.running_var, module.eps, first,
            owner.want_stats, owner.want_features)
        self._set_statistics(mean, var)
        return y

    def _record(self, x: torch.Tensor) -> None:
        """The plain path: the statistics and features through autograd."""
        owner = self.owner
        self.instance_mean = instance_means(x) if owner.want_features else None
        if owner.want_stats:
            view = x if owner.first is None else x[:owner.first]
            self._set_statistics(*channel_moments(view, self.module.running_mean))
        else:
            self._set_statistics(None, None)

    def _set_statistics(self, mean: torch.Tensor | None, var: torch.Tensor | None) -> None:
        if mean is None:
            self.r_feature = None
            return
        module = self.module
        self.last = (mean.detach(), var.detach())
        if self.momentum is not None:  # Fast-DFKD: statistics averaged over the batches so far
            rate = self.owner.momentum_rate
            mean = (1 - rate) * mean + rate * self.momentum[0]
            var = (1 - rate) * var + rate * self.momentum[1]
        self.r_feature = (torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def remove(self) -> None:
        if self.module.__dict__.get("forward") == self._forward:
            del self.module.forward


class BatchNormHooks:
    """One `BatchNormStatsHook` per BatchNorm2d of `model`, in module order.

    `stats`: compute the BN-statistics loss; `features`: the instance means; `fused`: eval-mode
    layers run as `ObservedBatchNorm` (False: the plain autograd path, the tests' reference)."""

    def __init__(self, model: nn.Module, stats: bool = True, features: bool = True,
                 momentum: list | None = None, momentum_rate: float = 0.0, fused: bool = True):
        self.want_stats, self.want_features, self.fused = stats, features, fused
        self.first: int | None = None  # batch statistics over the first `first` images only
        self.is_paused = False  # True: forwards leave every recorded value as it was (`paused()`)
        self.momentum_rate = momentum_rate
        self.hooks = []
        try:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    self.hooks.append(BatchNormStatsHook(m, self))
        except Exception:
            self.remove()  # no layer left half-hooked
            raise
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
