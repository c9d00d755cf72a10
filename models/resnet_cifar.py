"""He et al.'s CIFAR ResNets ("Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2): depth 6n+2, three stages of n BasicBlocks at 16-32-64 channels.

The x4 variants (resnet8x4, resnet32x4) are the wide teachers/students of the CRD
benchmark (Tian et al., "Contrastive Representation Distillation", ICLR 2020): stem 32,
stages 64-128-256. Shortcuts that change shape use a 1x1 conv + BN (option B), as the
CRD code does; for resnet20 that adds ~3k parameters over the paper's option A, well
inside the usual "0.27M".
"""

from __future__ import annotations

from .registry import register_model
from .resnet import ResNet


def _cifar_resnet(depth: int, stem: int, widths, num_classes: int, in_channels: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet([n, n, n], widths, stem, num_classes, in_channels)


# Two stride-2 stages: a 4x4 input still leaves a 1x1 map for the last stage.
@register_model(min_image_size=4)
def resnet8(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(8, 16, [16, 32, 64], num_classes, in_channels)


@register_model(min_image_size=4)
def resnet20(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(20, 16, [16, 32, 64], num_classes, in_channels)


@register_model(min_image_size=4)
def resnet32(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(32, 16, [16, 32, 64], num_classes, in_channels)


@register_model(min_image_size=4)
def resnet56(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(56, 16, [16, 32, 64], num_classes, in_channels)


@register_model(min_image_size=4)
def resnet8x4(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(8, 32, [64, 128, 256], num_classes, in_channels)


@register_model(min_image_size=4)
def resnet32x4(num_classes, in_channels=3, image_size=32):
    return _cifar_resnet(32, 32, [64, 128, 256], num_classes, in_channels)
