"""Classifier zoo and DFKD generators, built by name through one factory each.

    from models import create_model, create_generator, list_models
    teacher = create_model("wrn40_2", num_classes=10, in_channels=3, image_size=32)
    logits, feats = teacher(x, return_features=True)   # feats: (B, teacher.num_features)
    gen = create_generator("generator", latent_dim=256, image_size=32, out_channels=3)

Every classifier takes `forward(x, return_features=False)`, has `num_features`, and
normalises with nn.BatchNorm2d (the DFKD methods hook those layers). Plain PyTorch
only: nothing here imports ray or mlflow.
"""

from .fold import fold_batchnorm
from .fuse import inference_copy
from .registry import (
    UnknownModelError,
    create_generator,
    create_model,
    list_generators,
    list_models,
    register_generator,
    register_model,
)

# Imported for their side effect: each module registers its builders.
from . import generators, resnet, resnet_cifar, vgg, wide_resnet  # noqa: E402,F401

__all__ = [
    "UnknownModelError",
    "create_generator",
    "create_model",
    "fold_batchnorm",
    "inference_copy",
    "list_generators",
    "list_models",
    "register_generator",
    "register_model",
]
