"""Classifier checkpoints with the metadata needed to refuse a wrong one.

A checkpoint is `{"state_dict": ..., "meta": {...}}` saved with torch.save and loaded
with `weights_only=True`, so loading never runs code from the file. `meta` holds the
dataset, arch, number of classes, channels, image size, normalisation and accuracy.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from methods import place
from models import create_model
from orchestrator.core.errors import UsageError


def save_classifier(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": state, "meta": dict(meta)}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {path} ({type(exc).__name__}: {_reason(exc)}); delete it, or "
                         "train it again with python -m orchestrator.teachers ... --force") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise UsageError(f"checkpoint {path} is not a dfkd classifier checkpoint (no state_dict/meta)")
    return blob["state_dict"], blob["meta"]


def _reason(exc: Exception) -> str:
    """The informative line of an exception's message (torch puts advice first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if "weights_only" not in line and not line.startswith("(")]
    return ((informative or lines or [type(exc).__name__])[-1])[:300]


def load_classifier(path: str | Path, *, dataset: str | None = None, num_classes: int | None = None,
                    channels: int | None = None, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Loads a checkpoint and checks it fits the dataset it is about to be used with."""
    state, meta = read_checkpoint(path)
    expected = {"dataset": dataset, "num_classes": num_classes, "channels": channels}
    for key, want in expected.items():
        if want is not None and meta.get(key) != want:
            raise UsageError(f"checkpoint {path} was made for {key}={meta.get(key)!r}, "
                             f"but {want!r} is needed here")
    model = create_model(meta["arch"], meta["num_classes"], in_channels=meta["channels"],
                         image_size=meta["image_size"])
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        names = "; ".join(part for part in (
            f"missing {', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected {', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}" if unexpected
            else "") if part) or _reason(exc)
        raise UsageError(f"checkpoint {path} does not match arch {meta['arch']}: {names}") from None
    return place(model, device).eval(), meta
