"""Name -> builder registries for classifiers and generators, and their factories.

One registry per kind (timm style): a model file decorates its builder functions with
`@register_model` / `@register_generator`, and everything else in the project builds
networks only through `create_model` / `create_generator`. The factories check their
arguments here, once, so a typo or an unsupported image size ends in one clear
ValueError instead of a shape error deep inside a forward pass.

    from models import create_model, create_generator
    teacher = create_model("wrn40_2", num_classes=10)
    gen = create_generator("generator", latent_dim=256, image_size=32, out_channels=3)
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


class UnknownModelError(ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    # Smallest square input the network can take: below it the last stage would see a
    # feature map of less than 1x1 (a max-pool fails, or a stride only sees padding).
    min_image_size: int


_MODELS: dict[str, _Entry] = {}
_GENERATORS: dict[str, _Entry] = {}


def _registrar(table: dict[str, _Entry], kind: str):
    def register(fn=None, *, name: str | None = None, min_image_size: int = 8):
        # Usable bare (`@register_model`) or with options (`@register_model(min_image_size=4)`).
        def add(f):
            key = name or f.__name__
            if key in table:
                raise ValueError(f"{kind} {key!r} is registered twice")
            table[key] = _Entry(f, min_image_size)
            return f

        return add(fn) if fn is not None else add

    return register


register_model = _registrar(_MODELS, "model")
register_generator = _registrar(_GENERATORS, "generator")


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_generators() -> list[str]:
    return sorted(_GENERATORS)


def _lookup(table: dict[str, _Entry], kind: str, name) -> _Entry:
    if name in table:
        return table[name]
    known = sorted(table)
    hint = difflib.get_close_matches(str(name), known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise UnknownModelError(
        f"unknown {kind} {name!r}{suggestion}; known {kind}s: {', '.join(known)}"
    )


def _positive_int(value, what: str) -> int:
    # bool is an int subclass; True as a class count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_size(entry: _Entry, kind: str, name: str, image_size) -> int:
    _positive_int(image_size, "image_size")
    if image_size < entry.min_image_size:
        raise ValueError(
            f"{kind} {name!r} cannot handle {image_size}x{image_size} images; "
            f"it needs image_size >= {entry.min_image_size} (28, 32 and 64 are supported)"
        )
    return image_size


def _build(entry: _Entry, kind: str, name: str, **kwargs) -> nn.Module:
    # Bind first so a misspelled option is a ValueError naming the valid ones, not a
    # TypeError from deep inside; orchestrator turns ValueErrors into one-line messages.
    signature = inspect.signature(entry.builder)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        options = ", ".join(signature.parameters)
        raise ValueError(f"{kind} {name!r}: {exc}; it accepts: {options}") from None
    return entry.builder(**kwargs)


def create_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs
) -> nn.Module:
    """Build the classifier `name`; extra kwargs go to its builder (e.g. `dropout`)."""
    entry = _lookup(_MODELS, "model", name)
    _positive_int(num_classes, "num_classes")
    _positive_int(in_channels, "in_channels")
    _check_size(entry, "model", name, image_size)
    return _build(
        entry, "model", name,
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs,
    )


def create_generator(
    name: str, latent_dim: int, image_size: int, out_channels: int, **kwargs
) -> nn.Module:
    """Build the generator `name`; extra kwargs go to its builder (e.g. `ngf`)."""
    entry = _lookup(_GENERATORS, "generator", name)
    _positive_int(latent_dim, "latent_dim")
    _positive_int(out_channels, "out_channels")
    _check_size(entry, "generator", name, image_size)
    return _build(
        entry, "generator", name,
        latent_dim=latent_dim, image_size=image_size, out_channels=out_channels, **kwargs,
    )
