"""Guide sets: a few real or condensed images per class that steer guided model inversion
(issue #15, after Binici et al., "Condensed Sample-Guided Model Inversion for Knowledge
Distillation", arXiv:2408.13850).

    from orchestrator.core.guides import load_guide
    guide = load_guide("real:10", "fashion-mnist")       # 10 real training images per class, seed 0
    guide = load_guide("condensed:10", "fashion-mnist")  # the set `python -m orchestrator.condense` cached

The two kinds (`--guide KIND:K`):

- `real:K`: K real images per class from the TRAINING split (never the test split): a
  fixed random choice, the same for the same seed (default seed 0).
- `condensed:K`: K images per class condensed by distribution matching
  (`orchestrator/core/condensation.py`), started from the `real:K` images of the same seed.
  Read from the cache the `orchestrator.condense` CLI writes:
  `<cache>/condensed-<dataset>-k<K>-seed<S>.safetensors` (+ `.json`: how it was made,
  `.png`: a grid, one row per class). Default cache: `$DFKD_CHECKPOINTS/guides`
  (`checkpoints/guides`), beside the teachers.

A `GuideSet` holds float32 images in [0, 1] (class-major: K of class 0, then K of class 1,
...), int64 labels and `identity`, a flat dict for MLflow: kind, k, seed, dataset, the
SHA-256 of the image bytes, and the folder or file it was read from. Bad input is a
`UsageError` (one line, exit code 2 in every CLI); nothing is written by `load_guide`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.datasets import ImageSet, get_dataset_spec, load_split
from orchestrator.core.errors import UsageError

GUIDE_KINDS = ("real", "condensed")
DEFAULT_SEED = 0
DEFAULT_CACHE = Path(os.environ.get("DFKD_CHECKPOINTS", "checkpoints")) / "guides"


@dataclass
class GuideSet:
    images: torch.Tensor  # float32 (N, C, H, W) in [0, 1], class-major
    labels: torch.Tensor  # int64 (N,)
    identity: dict

    def __len__(self) -> int:
        return len(self.labels)


def parse_guide(text: str) -> tuple[str, int]:
    """`KIND:K` -> (kind, k); every malformed form is one message naming it."""
    kind, sep, k_text = str(text).partition(":")
    if not sep or not kind or not k_text:
        raise UsageError(f"--guide {text!r}: expected KIND:K with KIND one of {', '.join(GUIDE_KINDS)}, "
                         f"e.g. real:10")
    if kind not in GUIDE_KINDS:
        raise UsageError(f"--guide {text!r}: unknown guide kind {kind!r}; known kinds: {', '.join(GUIDE_KINDS)}")
    try:
        k = int(k_text)
    except ValueError:
        raise UsageError(f"--guide {text!r}: K must be a whole number of images per class, not {k_text!r}") from None
    check_k(k, f"--guide {text!r}")
    return kind, k


def check_k(k: int, flag: str) -> None:
    if k <= 0:
        raise UsageError(f"{flag}: the number of images per class (K = {k}) must be at least 1")


def image_sha256(images: torch.Tensor) -> str:
    """SHA-256 of the images' bytes as a float32 C-ordered array: what the guided method
    actually reads, so two sets with equal hashes are the same input."""
    return hashlib.sha256(images.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------- real
def select_real(train: ImageSet, k: int, seed: int) -> torch.Tensor:
    """Indices (class-major) of K training images per class: a random choice that depends
    only on the seed and the split, so the same seed picks the same images."""
    check_k(k, "--guide")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(train.spec.num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        if len(idx) < k:
            raise UsageError(f"K = {k} images per class, but class {c} of {train.spec.name} has only {len(idx)} "
                             f"training images (in {train.source}); use K <= {int(min_class_count(train))}")
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(chosen)


def min_class_count(train: ImageSet) -> int:
    return int(torch.bincount(train.labels, minlength=train.spec.num_classes).min())


def real_guide(dataset: str, k: int, seed: int, data_root=None) -> GuideSet:
    train = load_split(dataset, "train", data_root)  # the training split only, by construction
    idx = select_real(train, k, seed)
    images = train.images[idx].float() / 255
    return GuideSet(images, train.labels[idx].clone(), {
        "kind": "real", "k": k, "seed": seed, "dataset": dataset, "sha256": image_sha256(images),
        "source": str(train.source)})


# -------------------------------------------------------------------- condensed
def condensed_name(dataset: str, k: int, seed: int) -> str:
    return f"condensed-{dataset}-k{k}-seed{seed}"


def save_condensed(cache_dir: str | Path, dataset: str, k: int, seed: int, images: torch.Tensor,
                   labels: torch.Tensor, record: dict) -> Path:
    """Writes <name>.safetensors (the set; dataset, k and seed in its metadata, so the file
    alone says what it is), <name>.json (`record`: how it was made) and <name>.png."""
    from safetensors.torch import save_file
    from torchvision.utils import save_image

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{condensed_name(dataset, k, seed)}.safetensors"
    images = images.to(torch.float32).contiguous()
    meta = {"kind": "condensed", "dataset": dataset, "k": str(k), "seed": str(seed), "sha256": image_sha256(images)}
    # Written aside and renamed: an interrupted run never leaves a half file that looks cached.
    partial = path.with_suffix(".partial")
    save_file({"images": images, "labels": labels.to(torch.int64).contiguous()}, str(partial), metadata=meta)
    path.with_suffix(".json").write_text(json.dumps({**meta, **record}, indent=2))
    save_image(images, path.with_suffix(".png"), nrow=k, padding=1)  # one row per class
    os.replace(partial, path)
    return path


def condensed_guide(dataset: str, k: int, seed: int, cache_dir=None) -> GuideSet:
    """The cached condensed set; `cache_dir` is the cache folder or the .safetensors file.
    A file made for another dataset, K or seed than asked is refused, never used."""
    from safetensors import safe_open

    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    path = cache if cache.suffix == ".safetensors" else cache / f"{condensed_name(dataset, k, seed)}.safetensors"
    if not path.is_file():
        raise UsageError(f"no condensed set for {dataset}, K = {k}, seed {seed}: {path} does not exist; make it "
                         f"with: python -m orchestrator.condense --dataset {dataset} --k {k} --seed {seed} "
                         f"--out {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UsageError(f"cannot read the condensed set {path}: {exc}") from None
    made_for = (meta.get("dataset"), meta.get("k"), meta.get("seed"))
    if made_for != (dataset, str(k), str(seed)):
        raise UsageError(f"{path} holds a condensed set made for dataset {made_for[0]}, K = {made_for[1]}, "
                         f"seed {made_for[2]}, not the asked dataset {dataset}, K = {k}, seed {seed}")
    spec = get_dataset_spec(dataset)
    want = (spec.num_classes * k, spec.channels, spec.image_size, spec.image_size)
    if tuple(images.shape) != want or images.dtype != torch.float32 or len(labels) != want[0]:
        raise UsageError(f"{path}: images of shape {tuple(images.shape)} ({images.dtype}), expected {want} float32")
    sha = image_sha256(images)
    if meta.get("sha256") != sha:
        raise UsageError(f"{path}: its images do not match the SHA-256 recorded in it (damaged or edited)")
    return GuideSet(images, labels, {"kind": "condensed", "k": k, "seed": seed, "dataset": dataset, "sha256": sha,
                                     "source": str(path.resolve())})


def load_guide(kind_k: str, dataset: str, data_root=None, seed: int = DEFAULT_SEED, cache_dir=None,
               log=None) -> GuideSet:
    """The guide set `kind_k` ("real:K" or "condensed:K") of `dataset`; `log` (e.g. print)
    is told which folder or file was read."""
    kind, k = parse_guide(kind_k)
    get_dataset_spec(dataset)  # an unknown dataset is named before any file is looked at
    guide = real_guide(dataset, k, seed, data_root) if kind == "real" else condensed_guide(dataset, k, seed, cache_dir)
    if log:
        log(f"guide {kind_k} (seed {seed}) of {dataset}: {len(guide)} images from {guide.identity['source']}")
    return guide
