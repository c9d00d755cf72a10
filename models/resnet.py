"""CIFAR-style ResNet-18/34 (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), in the variant the DFKD benchmarks use for 32x32 inputs: a 3x3 stride-1 stem
and no max-pool, so a 32x32 image reaches the last stage at 4x4 instead of 1x1.

`ResNet` here is generic (stem width, stage widths, blocks per stage) and is reused by
`resnet_cifar.py` for the 3-stage He et al. CIFAR family; only the numbers differ.
Adaptive average pooling before the head is what lets the same weights shapes serve
28x28, 32x32 and 64x64 inputs.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN projects the shortcut whenever the
    shape changes (He et al.'s option B, as in the CRD/CMI benchmark code)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # No conv bias: the BatchNorm right after it has its own shift.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 -> stages of BasicBlocks (first stage stride 1, the others stride 2)
    -> global average pool -> linear."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        num_classes: int,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        stages, in_planes = [], stem_width
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, width, stride if j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self):
        # He init (fan_out) as in the CRD code and torchvision; BN starts as identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, return_features: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        features = self.pool(x).flatten(1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# Three stride-2 stages: 8x8 is the smallest input that keeps a 1x1 map at the end.
@register_model(min_image_size=8)
def resnet18(num_classes, in_channels=3, image_size=32):
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], 64, num_classes, in_channels)


@register_model(min_image_size=8)
def resnet34(num_classes, in_channels=3, image_size=32):
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes, in_channels)
