"""The Synthesizer interface every DFKD method implements, and its shared helpers.

The round loop (orchestrator/core/loop.py) only ever calls `synthesize()`, `sample()`,
`state_dict()`, `load_state_dict()` and reads `images_synthesized` (and, for a method whose
config asks for one-stage rounds, `begin_joint()` / `end_joint()`). What a method needs
from wherever it runs (in one process or across Ray actors) it declares on its class
(`fresh_kd_batches`, `store_capacity`, `kd_view`, `joint_steps`, its config's `warmup_epochs`), so
nothing outside methods/ asks which method, or which kind of method, it runs.
"""
from __future__ import annotations

import abc
import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .bank import InstanceBank
from .config import BaseConfig, ConfigError
from .spec import ImageSpec


@dataclass
class SynthesisResult:
    """One synthesis round: the batch kept (float [0, 1], CPU) and the unweighted loss
    terms of the kept step plus their weighted "total"."""

    images: torch.Tensor
    losses: dict[str, float]


def place(module: nn.Module, device) -> nn.Module:
    """Moves a network to `device` in channels_last memory format: oneDNN's convolutions
    run 1.3-2x faster in NHWC on the CPUs measured here (docs/results/teachers.md), and CUDA's
    tensor cores prefer it too. Inputs may stay NCHW; convolutions follow the weights."""
    return module.to(device=device, memory_format=torch.channels_last)


@contextmanager
def eval_mode(module: nn.Module):
    """Temporarily put `module` in eval mode: a student that scores synthetic images
    must not update its BN running statistics with them."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class Synthesizer(abc.ABC):
    """Makes synthetic images for one teacher/student pair.

    The teacher must be frozen: synthesizers keep it in eval mode, read its BatchNorm
    inputs through hooks that exist only during `synthesize()`, and back-propagate only
    into their own tensors (`backward(inputs=...)`), so neither the teacher's nor the
    student's parameters, gradients or running statistics change. Models must already
    be on `device`.
    """

    name: ClassVar[str]  # set by @register
    kind: ClassVar[str]  # a label for tables and docs ("generator", "inversion"); never dispatched on
    display: ClassVar[str] = ""  # its row label in result tables (set by @register: the name if empty)
    paper: ClassVar[str] = ""  # "Authors, venue year" for the README's method table
    optimizes: ClassVar[str] = ""  # one line: what the synthesis optimises
    Config: ClassVar[type[BaseConfig]]
    budgets: ClassVar[dict[str, dict]]
    # Plain data for Ray Tune, so methods/ needs no ray (the orchestrator converts it):
    # field -> {"type": "loguniform" | "uniform", "low", "high"} (floats),
    # {"type": "int", "low", "high"} (both inclusive) or {"type": "choice", "values": [...]}.
    # Loss weights and lr_g only for inversion methods: their g_steps sets the budget.
    SEARCH_SPACE: ClassVar[dict[str, dict]] = {}
    # Fields searched too when the cell has a guide set (`--guide`); without one they stay
    # at their defaults (a guided term without a guide set is refused).
    GUIDE_SEARCH_SPACE: ClassVar[dict[str, dict]] = {}
    # True: the method cannot run without a guide set (`--guide KIND:K`); it distills on it.
    requires_guide: ClassVar[bool] = False

    def __init__(self, teacher: nn.Module, student: nn.Module, config: BaseConfig,
                 spec: ImageSpec, bank: InstanceBank | None = None, device="cpu"):
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} needs a {self.Config.__qualname__}, "
                              f"got {type(config).__qualname__}")
        self.teacher = teacher.eval()
        self.student = student
        self.config = config
        self.spec = spec
        self.bank = bank
        self.device = torch.device(device)
        self.images_synthesized = 0  # images kept by synthesize(): synthesis_batch_size per round
        self.guide_images: torch.Tensor | None = None  # a guide set, if the cell has one (attach_guide)
        self.guide_labels: torch.Tensor | None = None

    @classmethod
    def search_space(cls, guided: bool = False) -> dict[str, dict]:
        """The Tune space; `guided`: the cell has a guide set, so its guided fields are searched too."""
        return copy.deepcopy({**cls.SEARCH_SPACE, **(cls.GUIDE_SEARCH_SPACE if guided else {})})

    @classmethod
    def needs_guide(cls, config: BaseConfig) -> str:
        """Why a cell of this method with this config must have a guide set ("" if it need not)."""
        reasons = ([f"{cls.name} distills on the guide images alone"] if cls.requires_guide else [])
        return "; ".join(reasons + config.guide_uses())

    @classmethod
    def row_label(cls, config: BaseConfig | None = None) -> str:
        """The method's row in result tables: `display`, plus a suffix per non-default option
        of `config` that makes it a variant (" +guide", " +mix", " +CRD", " one-stage"), so
        variants never share a row with the plain method."""
        return cls.display + ("".join(config.row_suffixes()) if config is not None else "")

    def attach_guide(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Gives the synthesizer the cell's guide set: float images in [0, 1] (N, C, H, W) and
        their int64 labels. The default keeps them on the device for the method to read."""
        if tuple(images.shape[1:]) != self.spec.shape or len(labels) != len(images):
            raise ConfigError(f"a guide set of images {tuple(images.shape)} and {len(labels)} labels does not fit "
                              f"images of shape {self.spec.shape}")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.spec.num_classes):
            raise ConfigError(f"guide labels must lie in [0, {self.spec.num_classes}), got {labels.min()}..{labels.max()}")
        self.guide_images = images.to(device=self.device, dtype=torch.float32)
        self.guide_labels = labels.to(device=self.device, dtype=torch.long)

    def check_guide(self) -> None:
        """A config that needs a guide set refuses to run without one (ConfigError)."""
        reason = self.needs_guide(self.config)
        if reason and self.guide_images is None:
            raise ConfigError(f"{reason}, but no guide set is attached; give the cell one (--guide KIND:K)")

    @abc.abstractmethod
    def synthesize(self) -> SynthesisResult:
        """One round of `config.g_steps` optimisation steps on a fresh batch."""

    @abc.abstractmethod
    def sample(self, batch_size: int) -> torch.Tensor:
        """Images for one KD step: float [0, 1], (batch_size, C, H, W), on `device`."""

    # -- what the method needs from wherever it runs ------------------------------------

    # True: every KD batch is drawn fresh from the synthesizer (`sample`), so a runtime
    # that trains students in other processes must ship each round's KD images to them.
    # False: KD batches are drawn from the bank of kept batches, through `kd_view`.
    fresh_kd_batches: ClassVar[bool] = False

    @classmethod
    def store_capacity(cls, config: BaseConfig) -> tuple[int | None, int | None]:
        """(images, feature rows) the method's bank or store must hold; None = unbounded."""
        return None, None

    @classmethod
    def joint_steps(cls, config: BaseConfig) -> int:
        """How many of a round's steps are joint steps (one-stage updates, docs/methods.md):
        one generator step and one KD step from a single forward and backward, split across
        `begin_joint()`, a trainer's `joint_step()` and `end_joint()`. 0: two stages."""
        return 0

    @property
    def one_stage(self) -> bool:
        return self.joint_steps(self.config) > 0

    @staticmethod
    def kd_view(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
        """How a KD step reads a batch drawn from the bank ([0, 1] floats in and out)."""
        return images

    def state_dict(self) -> dict:
        return {"images_synthesized": self.images_synthesized}

    def load_state_dict(self, state: dict) -> None:
        self.images_synthesized = int(state["images_synthesized"])

    # -- helpers for subclasses -------------------------------------------------------

    @property
    def uses_student(self) -> bool:
        """The student takes part in synthesis only through an adversarial term; with
        weight 0 the reference skips its forward pass, and so do we."""
        return getattr(self.config, "adv", 0.0) > 0

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.config.weights()
        return sum(weights[name] * value for name, value in terms.items())

    @staticmethod
    def report(terms: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
        """Unweighted terms plus the weighted total, as floats (NaN stays NaN: the loop
        decides what a non-finite loss means)."""
        out = {name: float(value.detach()) for name, value in terms.items()}
        out["total"] = float(total.detach())
        return out

    def random_targets(self) -> torch.Tensor:
        """Uniform class targets, sorted (only so that image grids read class by class)."""
        targets = torch.randint(0, self.spec.num_classes, (self.config.synthesis_batch_size,))
        return targets.sort().values.to(self.device)


class BestIterate:
    """The lowest-loss iterate of a synthesis loop, chosen on the device: no host sync per
    step (on a GPU a sync per step stalls the queue of kernels); the floats are read once,
    by `result()`. The same choice as comparing floats: strictly lower, and a NaN never
    replaces the first iterate (`x < nan` and `nan < x` are both false)."""

    def __init__(self):
        self.loss: torch.Tensor | None = None
        self.names: list[str] = []
        self.values: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []

    def offer(self, terms: dict[str, torch.Tensor], total: torch.Tensor, *tensors: torch.Tensor) -> None:
        """This step's unweighted terms, weighted total and the tensors to keep with it."""
        loss = total.detach()
        values = torch.stack([*(v.detach() for v in terms.values()), loss])
        if self.loss is None:  # copies: the caller's tensors may be updated in place next
            self.names, self.loss, self.values = [*terms, "total"], loss, values
            self.tensors = [t.detach().clone() for t in tensors]
            return
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.values = torch.where(better, values, self.values)
        self.tensors = [torch.where(better, t.detach(), kept) for t, kept in zip(tensors, self.tensors)]

    def result(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The kept tensors and the kept step's report (terms and "total" as floats)."""
        return self.tensors, dict(zip(self.names, self.values.tolist()))
