"""Saving and seeding the instance bank (`--save-bank DIR`, `--init-bank DIR`).

A saved bank is `DIR/bank.safetensors`: plain uint8 images, int64 labels and float
features, never pickled objects. `--init-bank` also takes a folder of PNG images, the
form in which the reference code ships its pre-inverted data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from orchestrator.core.errors import UsageError

BANK_FILE = "bank.safetensors"


def bank_arrays(bank) -> dict[str, torch.Tensor]:
    state = bank.state_dict()
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_bank(directory: str | Path, bank) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / BANK_FILE
    save_file(bank_arrays(bank), str(path))
    return path


def load_bank(directory: str | Path, bank, channels: int, image_size: int) -> None:
    directory = Path(directory)
    if (directory / BANK_FILE).exists():
        from safetensors.torch import load_file

        try:
            arrays = load_file(str(directory / BANK_FILE))
        except Exception as exc:
            raise UsageError(f"cannot read bank {directory / BANK_FILE}: {exc}") from None
        images = arrays.get("images")
        if images is None or images.dtype != torch.uint8 or tuple(images.shape[1:]) != (channels, image_size, image_size):
            raise UsageError(f"bank {directory} holds images of shape "
                             f"{None if images is None else tuple(images.shape[1:])}, "
                             f"expected {(channels, image_size, image_size)} uint8")
        bank.add(images, arrays.get("labels"), arrays.get("features"))
        return
    pngs = sorted(p for p in directory.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not pngs:
        raise UsageError(f"--init-bank {directory}: no {BANK_FILE} and no PNG/JPEG images found")
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(pngs), channels, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(pngs):
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode).resize((image_size, image_size)))
        out[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    bank.add(torch.from_numpy(out))
