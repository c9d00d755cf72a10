"""Supervised training and evaluation on real data (teachers and scratch students)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.datasets import ImageSet
from methods import place
from models import inference_copy


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: ImageSet, device="cpu", batch_size: int | None = None,
             size: int | None = None, fold: bool = True) -> float:
    """Top-1 accuracy in percent (on images resized to `size` if given); leaves the model's
    train/eval mode as it was. Inference mode: no autograd bookkeeping at all.

    Batches of 128 on a CPU: activations that stay in cache make a wrn16_1 pass 2.2x faster
    than batches of 1000 on this machine's two cores (docs/results/speed.md); a GPU wants
    large batches. `fold`: score the inference copy (models/fuse.py): each conv -> BN pair
    folded into one convolution (the same outputs to float rounding, one pass fewer per
    pair) and, on a CPU, ReLUs and residual adds done inside the convolutions (bit for
    bit); the copy costs milliseconds."""
    batch_size = batch_size or (1000 if str(device).startswith("cuda") else 128)
    was_training = model.training
    model.eval()
    net = inference_copy(model) if fold else model
    correct = 0
    for x, y in data.batches(batch_size, device=device):
        x = resize(x, size)
        correct += (net(normalize(x, data.spec.mean, data.spec.std)).argmax(1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(data), 1)


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == x.shape[-1]:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class Recipe:
    """The teacher-training recipe: SGD momentum 0.9, weight decay 5e-4, cosine schedule.

    `sizes` is progressive resizing: epoch i (for the first len(sizes) epochs) trains on the
    augmented batch resized to sizes[i] x sizes[i]. A 16x16 wrn16_2 step costs a quarter of
    a 32x32 one, so early, high-rate epochs at low resolution buy extra epochs (measured on
    Fashion-MNIST: 16-24-32 px beats both 2x32 px and 16-16-16-32 px, docs/results/teachers.md). The last
    epoch always trains at the dataset's own size, so the final model is scored at that
    size (the classifiers pool adaptively: any input side works)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sizes: tuple[int, ...] = ()
    warmup: float = 0.0  # fraction of all steps over which the rate rises linearly from 0

    def rate_factor(self, step: int, total: int) -> float:
        """Multiplier of `lr` at optimizer step `step` of `total`: linear warm-up, then cosine
        to zero. Over steps, not epochs: with the few epochs a CPU affords, a per-epoch
        staircase would spend most of the last epoch at a needlessly large rate."""
        warm = int(self.warmup * total)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    def size_at(self, epoch: int) -> int | None:
        """The training side for `epoch` (0-based), or None for the dataset's own size."""
        return self.sizes[epoch] if epoch < min(len(self.sizes), self.epochs - 1) else None


def train_classifier(model: torch.nn.Module, train: ImageSet, test: ImageSet, recipe: Recipe,
                     device="cpu", seed: int = 0, progress: bool = True) -> dict:
    """Trains with the dataset's augmentation; returns per-epoch loss/accuracy and time."""
    place(model, device).train()  # channels_last: 133 vs 64 images/s for wrn16_2 here
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=False)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: recipe.rate_factor(step, total_steps))
    history = {"epoch": [], "train_loss": [], "test_acc": [], "seconds": []}
    start = time.perf_counter()
    # One bar over every step of the run, so its ETA is the whole training's; a line per epoch.
    bar = tqdm(total=total_steps, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    for epoch in range(recipe.epochs):
        total, count = 0.0, 0
        size = recipe.size_at(epoch)
        bar.set_description(f"training, epoch {epoch + 1}/{recipe.epochs}")
        for x, y in train.batches(recipe.batch_size, shuffle=True, augment=True, generator=generator, device=device):
            x = resize(x, size)
            loss = F.cross_entropy(model(normalize(x, train.spec.mean, train.spec.std)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        # A low-resolution epoch is scored at its own size: its BatchNorm statistics are
        # those of that size, so a full-size score would say little (and cost 4x more).
        acc = evaluate(model, test, device, size=size)
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(total / max(count, 1))
        history["test_acc"].append(acc)
        history["seconds"].append(time.perf_counter() - start)
        if progress:
            shown = f"{size}px" if size is not None else f"{train.spec.image_size}px"
            bar.write(f"epoch {epoch + 1}/{recipe.epochs} ({shown})  loss {total / max(count, 1):.4f}  "
                      f"test acc {acc:.2f}%  ({time.perf_counter() - start:.0f}s)")
    bar.close()
    return history
