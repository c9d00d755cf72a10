"""Wide ResNets, CIFAR variant (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC
2016): WRN-d-k has (d-4)/6 pre-activation blocks per stage at 16k, 32k and 64k channels
after a 16-channel stem. wrn40_2 is the standard DFKD teacher; wrn16_1, wrn16_2 and
wrn40_1 are its students in the CMI benchmark table.

Dropout defaults to 0 as in the DFKD benchmarks; pass `dropout=0.3` to
`create_model` for the paper's regularised variant.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # A projected shortcut takes the pre-activated input, as in the authors' code;
        # an identity shortcut takes the raw input so the residual path stays clean.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(in_planes, width, stride, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks end un-normalised, so one last BN-ReLU before pooling.
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self):
        # The authors' init: He (fan_out) convs, identity BN, zero head bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x, return_features: bool = False):
        x = self.stages(self.conv1(x))
        x = F.relu(self.bn(x))
        features = self.pool(x).flatten(1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# Two stride-2 stages: a 4x4 input still leaves a 1x1 map for the last stage.
@register_model(min_image_size=4)
def wrn16_1(num_classes, in_channels=3, image_size=32, dropout=0.0):
    return WideResNet(16, 1, num_classes, in_channels, dropout)


@register_model(min_image_size=4)
def wrn16_2(num_classes, in_channels=3, image_size=32, dropout=0.0):
    return WideResNet(16, 2, num_classes, in_channels, dropout)


@register_model(min_image_size=4)
def wrn40_1(num_classes, in_channels=3, image_size=32, dropout=0.0):
    return WideResNet(40, 1, num_classes, in_channels, dropout)


@register_model(min_image_size=4)
def wrn40_2(num_classes, in_channels=3, image_size=32, dropout=0.0):
    return WideResNet(40, 2, num_classes, in_channels, dropout)
