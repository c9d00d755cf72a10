"""Which teacher -> student pairs each dataset is benchmarked on, and how its teachers
(and scratch students) are trained."""
from __future__ import annotations

# The five pairs of the CMI paper's CIFAR tables (Fang et al., IJCAI 2021, Tables 1-2), resnet34 -> resnet18 at
# 64x64 for Tiny-ImageNet, and one small pair for the 28x28 grey sets that a 2-core CPU
# runs in minutes.
SUITES: dict[str, list[tuple[str, str]]] = {
    "cifar10": [("resnet34", "resnet18"), ("vgg11", "resnet18"), ("wrn40_2", "wrn16_1"),
                ("wrn40_2", "wrn40_1"), ("wrn40_2", "wrn16_2")],
    "cifar100": [("resnet34", "resnet18"), ("vgg11", "resnet18"), ("wrn40_2", "wrn16_1"),
                 ("wrn40_2", "wrn40_1"), ("wrn40_2", "wrn16_2")],
    "tiny": [("resnet34", "resnet18")],
    "fashion-mnist": [("wrn16_2", "wrn16_1")],
    "mnist": [("wrn16_2", "wrn16_1")],
}

# Teacher-training recipe per dataset (SGD momentum 0.9, weight decay 5e-4, cosine).
# CIFAR/Tiny follow the reference benchmark (200 epochs, lr 0.1, batch 128). Fashion-MNIST
# gets what a 2-core CPU affords in 15 minutes (docs/results/teachers.md): 3 epochs with
# progressive resizing (training.Recipe.sizes) and batch 64, which costs about what batch
# 128 does per image here but takes twice the steps (92.03% against 91.46% at batch 128,
# lr 0.2; lr 0.15 at batch 64: 91.66%).
TEACHER_RECIPES: dict[str, dict] = {
    "cifar10": dict(epochs=200, batch_size=128, lr=0.1),
    "cifar100": dict(epochs=200, batch_size=128, lr=0.1),
    "tiny": dict(epochs=200, batch_size=128, lr=0.1),
    "fashion-mnist": dict(epochs=3, batch_size=64, lr=0.1, warmup=0.03, sizes=(16, 24)),
    "mnist": dict(epochs=3, batch_size=128, lr=0.1),
}


def suite(dataset: str) -> list[tuple[str, str]]:
    return list(SUITES[dataset])
