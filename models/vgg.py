"""VGG with BatchNorm (Simonyan & Zisserman, ICLR 2015), in the CIFAR form of the CRD
and CMI benchmark code: five conv blocks, 2x2 max-pools between them, global average
pooling and a single 512 -> classes linear head instead of VGG's three FC layers.

For 32x32 inputs the reference skips the pool after the fourth block, so the last two
blocks run at 4x4; for 64x64 (Tiny-ImageNet) it keeps it, which again ends at 4x4. We
make that choice once, from `image_size`, instead of testing the input height in every
forward; any input size still works thanks to the adaptive pool.
"""

from __future__ import annotations

import torch.nn as nn

from .registry import register_model

# Convs per block; vgg8 is CRD's shallow student ("S"), vgg11 / vgg13 are configs A / B.
_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    def __init__(
        self, config, num_classes: int, in_channels: int = 3, image_size: int = 32
    ):
        super().__init__()
        layers, c = [], in_channels
        for i, block in enumerate(config):
            for width in block:
                # Conv bias kept (redundant before BN) to match the reference's
                # parameter counts.
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width)]
                layers.append(nn.ReLU(inplace=True))
                c = width
            if i < 3 or (i == 3 and image_size >= 64):
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c
        self.fc = nn.Linear(c, num_classes)
        self._init_weights()

    def _init_weights(self):
        # As the CRD code: He (fan_out) convs, identity BN, small-normal head.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x, return_features: bool = False):
        features = self.pool(self.features(x)).flatten(1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# Three max-pools always run, so 8x8 is the smallest input that keeps a 1x1 map.
@register_model(min_image_size=8)
def vgg8(num_classes, in_channels=3, image_size=32):
    return VGG(_CONFIGS["vgg8"], num_classes, in_channels, image_size)


@register_model(min_image_size=8)
def vgg11(num_classes, in_channels=3, image_size=32):
    return VGG(_CONFIGS["vgg11"], num_classes, in_channels, image_size)


@register_model(min_image_size=8)
def vgg13(num_classes, in_channels=3, image_size=32):
    return VGG(_CONFIGS["vgg13"], num_classes, in_channels, image_size)
