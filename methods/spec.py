"""What a synthesizer needs to know about the images it makes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpec:
    """Shape and normalisation of a dataset's images.

    Teachers and students take normalised inputs; everything a synthesizer hands out is
    in [0, 1] (what a PNG holds), so `normalize` sits right in front of every forward.
    """

    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # The dataset's training augmentation, which inversion methods apply to their pool
    # as the reference does through its dataset transforms (CIFAR: crop pad 4 + flip).
    crop_padding: int = 4
    hflip: bool = True

    def __post_init__(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> standardised inputs for the networks."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised inputs -> pixels (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean
