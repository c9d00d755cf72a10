"""The classifier cache: a teacher (or a scratch student) trained on real data once and
reused, as `<dir>/<dataset>-<arch>.pt` with its metadata (dataset, arch, test accuracy,
normalisation, channels, image size, recipe). `python -m orchestrator.teachers` is its CLI."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from benchmarks.datasets import get_dataset_spec, load_split
from benchmarks.suites import TEACHER_RECIPES
from models import create_model, list_models
from orchestrator.core.checkpoints import load_classifier, save_classifier
from orchestrator.core.errors import UsageError
from orchestrator.core.training import Recipe, train_classifier

DEFAULT_DIR = Path(os.environ.get("DFKD_CHECKPOINTS", "checkpoints")) / "teachers"


# Teachers that ship with the project (benchmarks/teachers/): the default bench starts
# distilling at once instead of training a teacher for a quarter of an hour.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "teachers"


def checkpoint_path(out: str | Path, dataset: str, arch: str) -> Path:
    return Path(out) / f"{dataset}-{arch}.pt"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_teachers() -> dict[str, dict]:
    """benchmarks/teachers/manifest.json: file name -> sha256, accuracy, the command that
    reproduces it."""
    manifest = SHIPPED_DIR / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def find_checkpoint(out: str | Path, dataset: str, arch: str, log=print) -> Path | None:
    """The cached checkpoint of (dataset, arch) in `out`; a shipped one is copied there
    first (after checking its SHA-256) when the cache has none. None: it must be trained."""
    path = checkpoint_path(out, dataset, arch)
    if path.exists():
        return path
    entry = shipped_teachers().get(path.name)
    if entry is None:
        return None
    source = SHIPPED_DIR / path.name
    if not source.exists() or sha256(source) != entry["sha256"]:
        raise UsageError(f"the shipped teacher {source} is missing or does not match its SHA-256 "
                         f"{entry['sha256'][:12]}... in {SHIPPED_DIR / 'manifest.json'}; restore it from git")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    log(f"using the shipped teacher {path.name} ({entry['accuracy']:.2f}% test accuracy, sha256 "
        f"{entry['sha256'][:12]}...), copied to {path}")
    return path


def default_recipe(dataset: str, **overrides) -> Recipe:
    values = {**TEACHER_RECIPES[dataset], **{k: v for k, v in overrides.items() if v is not None}}
    recipe = Recipe(**{**values, "sizes": tuple(values.get("sizes", ()))})
    for flag, value, ok, allowed in (("--epochs", recipe.epochs, recipe.epochs >= 1, ">= 1"),
                                     ("--batch-size", recipe.batch_size, recipe.batch_size >= 1, ">= 1"),
                                     ("--lr", recipe.lr, recipe.lr > 0, "> 0")):
        if not ok:
            raise UsageError(f"invalid {flag} {value}: it must be {allowed}")
    if not 0.0 <= recipe.warmup < 1.0:
        raise UsageError(f"invalid --warmup {recipe.warmup}: a fraction of the steps in [0, 1)")
    if any(size < 8 for size in recipe.sizes):
        raise UsageError(f"invalid --sizes {list(recipe.sizes)}: every side must be at least 8 pixels")
    return recipe


def get_classifier(dataset: str, arch: str, *, out=DEFAULT_DIR, recipe: Recipe | None = None, device="cpu",
                   data_root=None, download=False, force=False, seed=0, progress=True,
                   log=print) -> tuple[torch.nn.Module, dict]:
    """Returns (model in eval mode, meta): the cached checkpoint, or a freshly trained one."""
    spec = get_dataset_spec(dataset)
    if arch not in list_models():
        create_model(arch, spec.num_classes)  # raises the error that lists known names
    path = checkpoint_path(out, dataset, arch)
    if not force and find_checkpoint(out, dataset, arch, log) is not None:
        model, meta = load_classifier(path, dataset=dataset, num_classes=spec.num_classes,
                                      channels=spec.channels, device=device)
        log(f"reusing {path} ({arch} on {dataset}: {meta['accuracy']:.2f}% test accuracy)")
        return model, meta
    recipe = recipe or default_recipe(dataset)
    train = load_split(dataset, "train", data_root, download)
    test = load_split(dataset, "test", data_root, download)
    torch.manual_seed(seed)
    model = create_model(arch, spec.num_classes, in_channels=spec.channels, image_size=spec.image_size)
    log(f"training {arch} on {dataset}: train split {len(train)} images from {train.source}, test split "
        f"{len(test)} images from {test.source}; {recipe}")
    history = train_classifier(model, train, test, recipe, device=device, seed=seed, progress=progress)
    accuracy = history["test_acc"][-1]  # evaluated after the last epoch
    meta = {
        "dataset": dataset, "arch": arch, "accuracy": accuracy,
        "num_classes": spec.num_classes, "channels": spec.channels, "image_size": spec.image_size,
        "mean": list(spec.mean), "std": list(spec.std), "seed": seed,
        "recipe": dataclasses.asdict(recipe), "train_seconds": history["seconds"][-1],
        "history": history,
    }
    save_classifier(path, model, meta)
    log(f"saved {path}")
    return model.eval(), meta
