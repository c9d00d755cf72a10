"""One cell, built in one place for every entry point and every place it runs.

A cell is one (dataset, teacher, student, method, seed, budget, mode), and optionally a guide
set (`guide`, "real:K" or "condensed:K": orchestrator/core/guides.py). `CellSpec.build`
resolves and validates its method config once (budget, then preset, then --set) and
everything a user can get wrong before any work starts; the spec is then passed down
as is, to this process's `run_in_process` or to Ray actors. The builders below give every
process the same teacher (loaded once per process), student (same seed, same draw), eval
set, synthesizer and cell files:

    <cell dir>/config.json     the cell key and its effective method config
    <cell dir>/history.json    per-epoch accuracy, loss terms, times, status
    <cell dir>/grid.png        a grid of synthetic images
    <cell dir>/student.pt      the distilled student (weights_only checkpoint)
    <cell dir>/state.pt        resume state, rewritten after every epoch
    <cell dir>/store/          the Ray store's snapshot (bench only)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.datasets import get_dataset_spec, load_split
from methods import BUDGETS, BaseConfig, ImageSpec, InstanceBank, create_synthesizer, get_method, make_config
from models import create_model
from orchestrator.core.bank_files import load_bank, save_bank
from orchestrator.core.checkpoints import load_classifier, save_classifier
from orchestrator.core.errors import UsageError
from orchestrator.core.guides import DEFAULT_SEED as GUIDE_SEED
from orchestrator.core.guides import load_guide, parse_guide
from orchestrator.core.loop import History, InProcess, RoundLoop, Trainer


@dataclass(frozen=True)
class CellKey:
    dataset: str
    teacher: str
    student: str
    method: str
    seed: int = 0
    budget: str = "cpu"
    mode: str = "paper"
    # The guide set ("real:10", "condensed:10"; "" = none). Only a cell that has one names it
    # (in `as_dict`, tags and slug), so every cell without one keeps its earlier identity.
    guide: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k == "guide" and not v)}

    def tags(self) -> dict[str, str]:
        return {f"cell.{k}": str(v) for k, v in self.as_dict().items()}

    @property
    def slug(self) -> str:
        guide = f"_guide-{self.guide.replace(':', '')}" if self.guide else ""
        return (f"{self.dataset}_{self.teacher}-{self.student}_{self.method}_"
                f"s{self.seed}_{self.budget}_{self.mode}{guide}")


@dataclass(frozen=True)
class CellSpec:
    """What a cell is: its key, its resolved config, and the inputs it reads."""

    key: CellKey
    config: BaseConfig
    teacher_ckpt: str  # absolute path of the teacher checkpoint
    data_root: str | None = None  # the dataset folder (absolute), or None for the lookup order
    eval_split: str = "test"  # "val": a fixed held-out slice of the train set (hyperparameter search)
    guide_cache: str | None = None  # a condensed guide set: its file (absolute), so every process reads it

    @classmethod
    def build(cls, key: CellKey, overrides: dict | None, teacher_ckpt: str | Path, data_root: str | None = None,
              eval_split: str = "test", guide_cache: str | None = None) -> "CellSpec":
        """Checks the cell (config, guide set) and resolves what it reads; UsageError when wrong."""
        config = check_cell(key, overrides)
        guide = check_guide(key, data_root, guide_cache)
        if guide is not None and guide.identity["kind"] == "condensed":
            guide_cache = guide.identity["source"]  # absolute: actors and trials run in other folders
        return cls(key, config, str(Path(teacher_ckpt).resolve()), data_root, eval_split, guide_cache)

    @property
    def method(self) -> type:
        return get_method(self.key.method)

    @property
    def image_spec(self) -> ImageSpec:
        return image_spec(self.key.dataset)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def load_guide(self):
        """The cell's guide set (GuideSet), loaded once per process; None without one."""
        return check_guide(self.key, self.data_root, self.guide_cache)

    def guide_params(self) -> dict[str, str]:
        """The guide set's identity as MLflow params (`guide.kind`, `.k`, `.seed`, `.dataset`,
        `.sha256`); empty without one."""
        guide = self.load_guide()
        if guide is None:
            return {}
        return {f"guide.{k}": str(guide.identity[k]) for k in ("kind", "k", "seed", "dataset", "sha256")}


def image_spec(dataset: str) -> ImageSpec:
    """What the methods need to know about a dataset's images."""
    spec = get_dataset_spec(dataset)
    return ImageSpec(spec.num_classes, spec.channels, spec.image_size, spec.mean, spec.std,
                     crop_padding=spec.crop_padding, hflip=spec.hflip)


def check_cell(key: CellKey, overrides: dict | None = None) -> BaseConfig:
    """Raises a user error for anything wrong with the cell; returns its method config."""
    spec = get_dataset_spec(key.dataset)
    get_method(key.method)
    if key.budget not in BUDGETS:
        raise UsageError(f"unknown budget '{key.budget}'; use one of {', '.join(BUDGETS)}")
    for role, arch in (("teacher", key.teacher), ("student", key.student)):
        try:
            create_model(arch, spec.num_classes, in_channels=spec.channels, image_size=spec.image_size)
        except ValueError as exc:
            raise UsageError(f"{role} '{arch}' cannot be built for {key.dataset}: {exc}") from None
    config = make_config(key.method, key.budget, overrides or {})
    if key.guide:
        parse_guide(key.guide)
    elif reason := get_method(key.method).needs_guide(config):
        raise UsageError(f"{key.method}: {reason}; give the cell a guide set with --guide KIND:K (e.g. real:10)")
    return config


def check_guide(key: CellKey, data_root: str | None = None, cache: str | None = None):
    """The cell's guide set (orchestrator/core/guides.py: `load_guide`, guide seed 0, so every
    training seed reads the same set), or None without one. Bad input (a malformed spec, K
    above a class's count, a missing or mismatched condensed set) is a UsageError; nothing is
    written. Loaded once per process and arguments."""
    if not key.guide:
        return None
    return _guide(key.guide, key.dataset, None if data_root is None else str(data_root),
                  None if cache is None else str(cache))


@functools.lru_cache(maxsize=4)
def _guide(kind_k: str, dataset: str, data_root: str | None, cache: str | None):
    return load_guide(kind_k, dataset, data_root, seed=GUIDE_SEED, cache_dir=cache)


# ------------------------------------------------------------------- the parts of a cell
def load_teacher(path: str, dataset: str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The frozen teacher, loaded once per process (several cells of a process share it:
    nobody writes to a frozen, eval-mode teacher); a rewritten file is loaded again."""
    return _load_teacher(str(path), Path(path).stat().st_mtime_ns if Path(path).exists() else 0, dataset, device)


@functools.lru_cache(maxsize=4)
def _load_teacher(path: str, mtime: int, dataset: str, device: str) -> tuple[torch.nn.Module, dict]:
    spec = get_dataset_spec(dataset)
    # Building the network draws random initial weights before the checkpoint overwrites
    # them: that must not move this process's random stream, or a cell's draws would
    # depend on whether (and when) its process had loaded the teacher already.
    with torch.random.fork_rng(devices=[]):
        model, meta = load_classifier(path, dataset=dataset, num_classes=spec.num_classes, channels=spec.channels,
                                      device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def make_student(spec: CellSpec, arch: str | None = None) -> torch.nn.Module:
    """The student, seeded right before it is drawn: the same initial weights in every
    process that builds it (the synthesizer's replica and the trainer's student alike)."""
    ds = get_dataset_spec(spec.key.dataset)
    torch.manual_seed(spec.key.seed)
    return create_model(arch or spec.key.student, ds.num_classes, in_channels=ds.channels,
                        image_size=ds.image_size)


@functools.lru_cache(maxsize=2)
def _eval_set(dataset: str, data_root: str | None, split: str):
    if split == "val":
        return validation_split(load_split(dataset, "train", data_root))
    return load_split(dataset, "test", data_root)


def load_eval_set(spec: CellSpec):
    return _eval_set(spec.key.dataset, spec.data_root, spec.eval_split)


def validation_split(train, fraction: float = 0.1, seed: int = 1234):
    """A fixed held-out slice of the train set, for scoring hyperparameter trials."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[: max(int(len(train) * fraction), 1)])


class StudentEnsemble(torch.nn.Module):
    """Shared mode: the synthesizer plays against all students at once through the mean
    of their logits (one student: exactly that student)."""

    def __init__(self, students: list[torch.nn.Module]):
        super().__init__()
        self.students = torch.nn.ModuleList(students)

    def forward(self, x, return_features=False):
        if len(self.students) == 1:
            return self.students[0](x, return_features=return_features)
        return torch.stack([s(x) for s in self.students]).mean(0)


def make_synthesizer(spec: CellSpec, teacher, students: list[torch.nn.Module], bank=None, device="cpu"):
    """The method's synthesizer against one student (itself) or several (their ensemble)."""
    opponent = students[0] if len(students) == 1 else StudentEnsemble(students)
    synthesizer = create_synthesizer(spec.key.method, teacher, opponent, spec.config, spec.image_spec, bank=bank,
                                     device=device)
    if (guide := spec.load_guide()) is not None:  # read from disk in every process, never shipped
        synthesizer.attach_guide(guide.images, guide.labels)
    return synthesizer


def make_trainer(spec: CellSpec, student: torch.nn.Module, device="cpu") -> Trainer:
    teacher, _ = load_teacher(spec.teacher_ckpt, spec.key.dataset, device)
    trainer = Trainer(teacher, student, spec.config, load_eval_set(spec), spec.image_spec, device)
    if (guide := spec.load_guide()) is not None:  # for guide_mix
        trainer.attach_guide(guide.images, guide.labels)
    return trainer


# --------------------------------------------------------------------- the cell's record
@dataclass
class CellResult:
    key: CellKey
    history: History
    config: dict
    cell_dir: Path
    wall_seconds: float
    teacher_accuracy: float = float("nan")
    run_id: str | None = None
    startup_seconds: float = 0.0  # before the first round: loading, building, starting actors

    def summary(self) -> dict:
        return {**self.history.summary(), "teacher_accuracy": self.teacher_accuracy,
                "wall_seconds": self.wall_seconds, "startup_seconds": self.startup_seconds}


def write_cell_files(cell_dir: Path, spec: CellSpec, history: History, student: torch.nn.Module | None = None,
                     grid: torch.Tensor | None = None) -> None:
    """config.json and history.json always; student.pt and grid.png when given."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    key = spec.key
    from orchestrator.core.provenance import cell_provenance

    (cell_dir / "config.json").write_text(json.dumps({"cell": key.as_dict(), "config": spec.config_dict(),
                                                      "provenance": cell_provenance(spec)}, indent=2))
    (cell_dir / "history.json").write_text(json.dumps(dataclasses.asdict(history), indent=2))
    if grid is not None:
        from torchvision.utils import save_image

        save_image(grid.float().clamp(0, 1), cell_dir / "grid.png", nrow=8, padding=1)
    if student is not None:
        ds = get_dataset_spec(key.dataset)
        save_classifier(cell_dir / "student.pt", student, {
            "dataset": key.dataset, "arch": key.student, "num_classes": ds.num_classes, "channels": ds.channels,
            "image_size": ds.image_size, "mean": list(ds.mean), "std": list(ds.std),
            "accuracy": history.summary()["accuracy"], "distilled_from": key.teacher, "method": key.method})


@torch.no_grad()
def grid_images(synthesizer, count: int = 64) -> torch.Tensor:
    """What the student trains on: fresh samples (generator methods) or the bank."""
    return synthesizer.sample(count).detach().cpu().clamp(0, 1)


# ------------------------------------------------------------------ a cell in this process
def run_in_process(spec: CellSpec, cell_dir: Path, device="cpu", *, resume: bool = True,
                   init_bank: Path | None = None, save_bank_to: Path | None = None,
                   on_epoch: Callable[[int, dict], None] | None = None, progress: Callable | None = None,
                   log=print) -> CellResult:
    """Runs (or continues, from `<cell dir>/state.pt`) one cell in this process: the round
    loop with the `InProcess` strategy. Never raises on NaN/Inf: the status says so."""
    started = time.perf_counter()
    teacher, meta = load_teacher(spec.teacher_ckpt, spec.key.dataset, device)
    student = make_student(spec)
    bank = InstanceBank(*spec.method.store_capacity(spec.config))
    if init_bank:
        load_bank(init_bank, bank, spec.image_spec.channels, spec.image_spec.image_size)
        log(f"seeded the bank with {len(bank)} images from {init_bank}")
    synthesizer = make_synthesizer(spec, teacher, [student], bank, device)
    trainer = make_trainer(spec, student, device)
    split = "a 10% validation slice of the train split" if spec.eval_split == "val" else "the test split"
    log(f"evaluating on {split}: {len(trainer.eval_set)} images from {trainer.eval_set.source}")
    cell_dir = Path(cell_dir)
    write_cell_files(cell_dir, spec, History())
    state_path = cell_dir / "state.pt"
    if not resume:
        state_path.unlink(missing_ok=True)
    loop = RoundLoop(InProcess(synthesizer, [trainer]), spec.config, 1, state_path)
    try:
        loop.restore()
    except UsageError as exc:
        raise UsageError(f"{exc} (distill --fresh does that)") from None
    startup = time.perf_counter() - started
    (history,) = loop.run(on_epoch=(lambda i, epoch, m: on_epoch(epoch, m)) if on_epoch else None, progress=progress)
    write_cell_files(cell_dir, spec, history, student, grid_images(synthesizer))
    if save_bank_to:
        save_bank(save_bank_to, bank)
    return CellResult(spec.key, history, spec.config_dict(), cell_dir, time.perf_counter() - started,
                      float(meta.get("accuracy", float("nan"))), startup_seconds=startup)
