"""Image generators for data-free KD: a latent code z -> an image batch in [0, 1].

`generator` is the DCGAN-like network shared by DAFL (Chen et al., ICCV 2019), ZSKT
(Micaelli & Storkey, NeurIPS 2019), DFAD (Fang et al., 2019), DFQ (Choi et al., CVPRW
2020) and CMI (Fang et al., IJCAI 2021): a linear layer to a (2*ngf, s, s) map with
s = image_size / 4, then two nearest-neighbour x2 upsampling + conv3x3 + BN + LeakyReLU
stages and a conv3x3 + sigmoid to pixels. `generator_large` has one more upsampling
stage (starting at image_size / 8) and twice the channels, for 64x64 data.

The output is in [0, 1] (sigmoid), i.e. unnormalised pixels: the caller applies the
dataset's normalisation before the teacher, exactly as for real images.

    g = create_generator("generator", latent_dim=256, image_size=32, out_channels=3)
    x = g(torch.randn(64, g.latent_dim))       # (64, 3, 32, 32), values in [0, 1]
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_generator


class UpsamplingGenerator(nn.Module):
    """Linear -> BN -> [Upsample x2 -> conv3x3 -> BN -> LeakyReLU(0.2)] per width after
    the first -> conv3x3 -> sigmoid. `widths[0]` is the channel count of the initial map."""

    def __init__(
        self, latent_dim: int, image_size: int, out_channels: int, widths: Sequence[int]
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_size = image_size
        factor = 2 ** (len(widths) - 1)
        # Round the start size up so sizes that are not multiples of `factor` (28 for the
        # large generator) come out a little big and are resized down, not padded.
        self.init_size = math.ceil(image_size / factor)
        self.init_channels = widths[0]
        self.fc = nn.Linear(latent_dim, widths[0] * self.init_size**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Upsample(scale_factor=2),
                # No conv bias: the BatchNorm right after it has its own shift.
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], out_channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.init_channels, self.init_size, self.init_size)
        x = self.body(x)
        if x.shape[-1] != self.image_size:
            # Resize before the last conv so it can smooth the interpolation.
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.to_image(x)

    @torch.no_grad()
    def reinitialize(self) -> None:
        """Fresh random weights and BN statistics. CMI restarts its generator this way
        for every synthesized batch, so each batch explores from a new starting point."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


# s = image_size / 4 must be at least 1.
@register_generator(min_image_size=4)
def generator(latent_dim, image_size, out_channels, ngf=64):
    return UpsamplingGenerator(latent_dim, image_size, out_channels, [2 * ngf, 2 * ngf, ngf])


# s = image_size / 8 must be at least 1.
@register_generator(min_image_size=8)
def generator_large(latent_dim, image_size, out_channels, ngf=64):
    # Every hidden width is twice the standard generator's, plus one more x2 stage.
    widths = [4 * ngf, 4 * ngf, 2 * ngf, 2 * ngf]
    return UpsamplingGenerator(latent_dim, image_size, out_channels, widths)


class NoisyLabelGenerator(nn.Module):
    """NAYER's generator (Tran et al., CVPR 2024): a fixed per-class label embedding,
    batch-normalised, goes through a *noisy layer* (one Linear per chunk of `chunk` images,
    re-drawn from N(0, 1) at every synthesis loop by `reinit_noisy_layer`) into the
    standard generator body (linear -> BN -> 2 x [up x2, conv3x3, BN, LeakyReLU] -> conv3x3 ->
    sigmoid). The paper embeds class names with CLIP; no CLIP weights are reachable here,
    so the embedding is one-hot (the noisy layer then holds one random vector per class).
    """

    def __init__(self, num_classes: int, image_size: int, out_channels: int, batch_size: int,
                 chunk: int | None = None, embedding_dim: int = 256, ngf: int = 64):
        super().__init__()
        self.register_buffer("label_embedding", torch.eye(num_classes))
        self.chunk = chunk or num_classes
        self.norm = nn.BatchNorm1d(num_classes)
        self.noisy = nn.ModuleList(nn.Linear(num_classes, embedding_dim)
                                   for _ in range(math.ceil(batch_size / self.chunk)))
        self.body = UpsamplingGenerator(embedding_dim, image_size, out_channels, [2 * ngf, 2 * ngf, ngf])
        self.reinit_noisy_layer()

    @torch.no_grad()
    def reinit_noisy_layer(self) -> None:
        for layer in self.noisy:
            nn.init.normal_(layer.weight, 0.0, 1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        e = self.norm(self.label_embedding[targets])
        parts = e.split(self.chunk)
        if len(parts) > len(self.noisy):
            raise ValueError(f"{len(targets)} targets but a noisy layer for {len(self.noisy) * self.chunk}")
        return self.body(torch.cat([layer(part) for layer, part in zip(self.noisy, parts)]))
