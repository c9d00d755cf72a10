"""Real datasets in their real on-disk formats, held in memory as uint8 tensors.

    from benchmarks.datasets import get_dataset_spec, load_split
    train = load_split("fashion-mnist", "train")          # ImageSet, uint8 (N, 1, 32, 32)
    for x, y in train.batches(128, shuffle=True, augment=True): ...   # x float in [0, 1]

Why in memory and batched: a 2-core CPU spends more time in per-sample PIL transforms
and DataLoader workers than in a small network's forward pass. The largest set here
(Tiny-ImageNet train, 100k x 3 x 64 x 64) is 1.2 GB as uint8, so every dataset fits,
and crop/flip are applied to whole batches with one random draw per image.

Lookup order for a dataset's files (README, Data): `--data-root` (the folder itself or
`<root>/<dataset folder>`), then the environment variable DFKD_DATA, then well-known local
copies (./data, ~/.cache/dfkd/data, Debian's /usr/share/datasets), then a download, but
only when the caller asks for one (`download=True`).
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


class DatasetError(ValueError):
    """A user-facing problem with a dataset: unknown name, missing or unreadable files."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    channels: int
    image_size: int  # after padding (28x28 MNIST-style images are zero-padded to 32)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # train-time random crop with this zero padding
    hflip: bool  # train-time random horizontal flip
    folders: tuple[str, ...]  # folder names tried under each search root
    reader: Callable[[Path, str], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    how_to_get: str = ""
    downloader: Callable[[Path], None] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- readers
# Each reader takes the dataset's folder and "train" or "test" and returns
# (uint8 images N x C x H x W, int64 labels N). They raise FileNotFoundError when the
# files are absent (the lookup then tries the next place) and DatasetError when the
# files are there but unreadable.

def _read_cifar(folder: Path, split: str, batches: dict[str, list[str]], label_key: str):
    images, labels = [], []
    for name in batches[split]:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(path)
        try:
            with open(path, "rb") as fh:
                # CIFAR's python batches are pickled dicts of numpy arrays; that is the
                # dataset's own published format, read only from the data folder.
                entry = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        except Exception as exc:  # corrupt pickle, wrong keys, wrong sizes
            raise DatasetError(f"unreadable CIFAR batch {path}: {exc}") from exc
    return np.concatenate(images), np.concatenate(labels)


def read_cifar10(folder: Path, split: str):
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _read_cifar(folder, split, batches, "labels")


def read_cifar100(folder: Path, split: str):
    return _read_cifar(folder, split, {"train": ["train"], "test": ["test"]}, "fine_labels")


def _open_maybe_gz(folder: Path, stem: str):
    for name in (stem, stem + ".gz"):
        path = folder / name
        if path.exists():
            return path, (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb"))
    raise FileNotFoundError(folder / stem)


def read_idx(folder: Path, stem: str) -> np.ndarray:
    """Reads an MNIST-style idx file (`stem` or `stem.gz`)."""
    path, fh = _open_maybe_gz(folder, stem)
    try:
        with fh:
            data = fh.read()
    except (OSError, EOFError) as exc:  # truncated gzip, permissions, ...
        raise DatasetError(f"unreadable idx file {path}: {exc}") from exc
    try:
        zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(dims).copy()
    except Exception as exc:
        raise DatasetError(f"unreadable idx file {path}: {exc}") from exc


def read_mnist_like(folder: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = read_idx(folder, f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{folder}: {len(images)} images but {len(labels)} labels")
    # 28x28 -> 32x32 with zero padding, so the CIFAR architectures apply unchanged.
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return images, labels


def _read_jpegs(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), 3, 64, 64), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            out[i] = np.asarray(img.convert("RGB").resize((64, 64))).transpose(2, 0, 1)
    return out


def read_tiny_imagenet(folder: Path, split: str):
    """Tiny-ImageNet's folder layout: wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG with val/val_annotations.txt. Its labelled "val" split is the
    test set (the official test split has no labels)."""
    wnids_file = folder / "wnids.txt"
    if not wnids_file.exists():
        raise FileNotFoundError(wnids_file)
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for wnid in wnids:
            for path in sorted((folder / "train" / wnid / "images").glob("*")):
                paths.append(path)
                labels.append(index[wnid])
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise FileNotFoundError(annotations)
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DatasetError(f"{annotations}: class {parts[1]} is not in wnids.txt")
            paths.append(folder / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    if not paths:
        raise FileNotFoundError(folder / split)
    try:
        images = _read_jpegs(paths)
    except OSError as exc:
        raise DatasetError(f"unreadable Tiny-ImageNet image: {exc}") from exc
    return images, np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------ downloads
def _torchvision_downloader(cls_name: str, subfolder: str):
    def download(root: Path) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    return download


def _download_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))


# ------------------------------------------------------------------------- registry
_DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    _DATASETS[spec.name] = spec


_register(DatasetSpec(
    "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 4, True,
    ("cifar-10-batches-py", "cifar10"), read_cifar10,
    "the python version of CIFAR-10 (cifar-10-python.tar.gz), extracted",
    _torchvision_downloader("CIFAR10", "cifar-10-batches-py")))
_register(DatasetSpec(
    "cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 4, True,
    ("cifar-100-python", "cifar100"), read_cifar100,
    "the python version of CIFAR-100 (cifar-100-python.tar.gz), extracted",
    _torchvision_downloader("CIFAR100", "cifar-100-python")))
_register(DatasetSpec(
    "tiny", 200, 3, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 8, True,
    ("tiny-imagenet-200", "tiny-imagenet", "tiny"), read_tiny_imagenet,
    "tiny-imagenet-200.zip, extracted", _download_tiny))
_register(DatasetSpec(
    "fashion-mnist", 10, 1, 32, (0.2860,), (0.3530,), 4, True,
    ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist"), read_mnist_like,
    "Debian: apt-get install dataset-fashion-mnist", _torchvision_downloader("FashionMNIST", "FashionMNIST/raw")))
_register(DatasetSpec(
    "mnist", 10, 1, 32, (0.1307,), (0.3081,), 4, False,  # digits are not flip-invariant
    ("mnist", "MNIST/raw"), read_mnist_like,
    "the four MNIST idx files (train/t10k images/labels, gzipped or not)",
    _torchvision_downloader("MNIST", "MNIST/raw")))


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return _DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset '{name}'; known datasets: {', '.join(list_datasets())}") from None


# --------------------------------------------------------------------------- lookup
WELL_KNOWN_ROOTS = (Path("data"), Path.home() / ".cache" / "dfkd" / "data", Path("/usr/share/datasets"))


def search_roots(data_root: str | Path | None) -> list[Path]:
    roots = []
    if data_root:
        roots.append(Path(data_root))
    if os.environ.get("DFKD_DATA"):
        roots.append(Path(os.environ["DFKD_DATA"]))
    roots.extend(WELL_KNOWN_ROOTS)
    return roots


def _candidates(spec: DatasetSpec, roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        out.append(root)  # the root may be the dataset folder itself
        out.extend(root / folder for folder in spec.folders)
    return out


@dataclass
class ImageSet:
    """A split in memory: uint8 images (N, C, H, W) and int64 labels, plus the spec."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec
    source: Path

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[indices], self.labels[indices], self.spec, self.source)

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (images float in [0, 1], labels); augmentation = the spec's train transforms."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            x = self.images[idx].to(device, non_blocking=True).float().div_(255)
            if augment:
                x = train_augment(x, self.spec, generator)
            yield x, self.labels[idx].to(device, non_blocking=True)


def train_augment(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """The dataset's train-time augmentation on a float batch: random crop with zero
    padding, then (if the spec says so) a horizontal flip; one random draw per image."""
    n, _, h, w = x.shape
    pad = spec.crop_padding
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    if spec.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def load_split(name: str, split: str, data_root: str | Path | None = None, download: bool = False) -> ImageSet:
    """Loads `split` ("train" or "test") of dataset `name`, following the lookup order."""
    spec = get_dataset_spec(name)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split '{split}'; use train or test")
    if data_root and not Path(data_root).is_dir() and not download:
        raise DatasetError(f"--data-root {data_root} is not a folder")
    # A root the user names is the only place looked: a copy elsewhere on the machine must
    # never stand in for it silently (nor supply the split it lacks).
    roots = [Path(data_root)] if data_root else search_roots(None)
    looked, partial = [], []
    for folder in _candidates(spec, roots):
        looked.append(folder)
        if not folder.is_dir():
            continue
        try:
            images, labels = spec.reader(folder, split)
        except FileNotFoundError as exc:
            if any(folder.iterdir()):  # a folder with some files: say which one it lacks
                missing = exc.filename or (exc.args[0] if exc.args else "a file")
                partial.append(f"{folder} lacks {Path(str(missing)).relative_to(folder) if str(missing).startswith(str(folder)) else missing}")
            continue
        return _checked(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), spec, folder))
    if download:
        target = Path(data_root) if data_root else WELL_KNOWN_ROOTS[1]
        target.mkdir(parents=True, exist_ok=True)
        try:
            spec.downloader(target)
        except Exception as exc:
            raise DatasetError(f"downloading {name} into {target} failed: {exc}") from exc
        return load_split(name, split, target, download=False)
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    lacking = f" ({'; '.join(dict.fromkeys(partial))})" if partial else ""
    raise DatasetError(
        f"dataset '{name}' ({split}) not found{lacking}; looked in: {where}. "
        f"Get {spec.how_to_get} and pass --data-root DIR, or pass --download.")


def _checked(data: ImageSet) -> ImageSet:
    spec = data.spec
    c, h, w = data.images.shape[1:]
    if c != spec.channels or h != spec.image_size or w != spec.image_size:
        raise DatasetError(f"{data.source}: images are {c}x{h}x{w}, expected "
                           f"{spec.channels}x{spec.image_size}x{spec.image_size} for {spec.name}")
    if len(data) and (data.labels.min() < 0 or data.labels.max() >= spec.num_classes):
        raise DatasetError(f"{data.source}: labels outside 0..{spec.num_classes - 1}")
    return data
