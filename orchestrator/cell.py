"""One benchmark cell, set up once for every entry point (distill, bench actors, tune trials).

A cell is keyed by (dataset, teacher, student, method, seed, budget, mode). `check_cell`
validates everything a user can get wrong before any work starts; `run_cell` trains (or
reuses) the teacher, builds the student and the method's synthesizer, runs the loop and
writes the cell's files:

    <out>/<cell slug>/config.json     the effective method config
    <out>/<cell slug>/history.json    per-epoch accuracy, loss terms, times, status
    <out>/<cell slug>/grid.png        a grid of synthetic images
    <out>/<cell slug>/student.pt      the distilled student (weights_only checkpoint)
    <out>/<cell slug>/state.pt        resume state, rewritten after every epoch
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.datasets import get_dataset_spec, load_split
from methods import ImageSpec, InstanceBank, create_synthesizer, get_method, make_config
from models import create_model
from orchestrator.checkpoints import load_classifier, save_classifier
from orchestrator.cli import UsageError
from orchestrator.loop import History, distill, image_spec_for
from orchestrator.pools import load_pool, save_pool
from orchestrator.teachers import DEFAULT_DIR as DEFAULT_TEACHER_DIR
from orchestrator.teachers import get_classifier

BUDGETS = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class CellKey:
    dataset: str
    teacher: str
    student: str
    method: str
    seed: int = 0
    budget: str = "cpu"
    mode: str = "paper"

    def tags(self) -> dict[str, str]:
        return {f"cell.{k}": str(v) for k, v in dataclasses.asdict(self).items()}

    @property
    def slug(self) -> str:
        return (f"{self.dataset}_{self.teacher}-{self.student}_{self.method}_"
                f"s{self.seed}_{self.budget}_{self.mode}")


@dataclass
class CellRequest:
    key: CellKey
    overrides: dict = field(default_factory=dict)  # --set key=value (strings or numbers)
    out: Path = Path("runs")
    data_root: str | None = None
    download: bool = False
    device: str = "cpu"
    teacher_dir: Path = DEFAULT_TEACHER_DIR
    teacher_ckpt: Path | None = None  # an external teacher instead of the cached one
    init_pool: Path | None = None
    save_pool: Path | None = None
    eval_split: str = "test"  # "val": a held-out slice of the train set (hyperparameter search)
    resume: bool = True  # continue from <cell>/state.pt when it exists
    progress: bool = True

    @property
    def cell_dir(self) -> Path:
        return Path(self.out) / self.key.slug


@dataclass
class CellResult:
    key: CellKey
    history: History
    config: dict
    teacher_accuracy: float
    cell_dir: Path
    wall_seconds: float

    def summary(self) -> dict:
        return {**self.history.summary(), "teacher_accuracy": self.teacher_accuracy,
                "wall_seconds": self.wall_seconds}


def image_spec(dataset: str) -> ImageSpec:
    return image_spec_for(get_dataset_spec(dataset))


def check_cell(key: CellKey, overrides: dict | None = None):
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
    return make_config(key.method, key.budget, overrides or {})


def validation_split(train, fraction: float = 0.1, seed: int = 1234):
    """A fixed held-out slice of the train set, for scoring hyperparameter trials."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[: max(int(len(train) * fraction), 1)])


def load_teacher(request: CellRequest, log=print):
    key, spec = request.key, get_dataset_spec(request.key.dataset)
    if request.teacher_ckpt:
        model, meta = load_classifier(request.teacher_ckpt, dataset=key.dataset, num_classes=spec.num_classes,
                                      channels=spec.channels, device=request.device)
        if meta.get("arch") != key.teacher:
            raise UsageError(f"--teacher-ckpt {request.teacher_ckpt} holds a {meta.get('arch')}, not a "
                             f"{key.teacher}: pass --teacher {meta.get('arch')}")
        return model, meta
    return get_classifier(key.dataset, key.teacher, out=request.teacher_dir, device=request.device,
                          data_root=request.data_root, download=request.download, progress=request.progress,
                          log=log)


def run_cell(request: CellRequest, *, on_epoch: Callable[[int, dict], None] | None = None,
             bank: InstanceBank | None = None, progress: Callable | None = None, log=print) -> CellResult:
    key = request.key
    config = check_cell(key, request.overrides)
    spec = get_dataset_spec(key.dataset)
    started = time.perf_counter()
    teacher, meta = load_teacher(request, log)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if request.eval_split == "val":
        eval_set = validation_split(load_split(key.dataset, "train", request.data_root, request.download))
    else:
        eval_set = load_split(key.dataset, "test", request.data_root, request.download)

    torch.manual_seed(key.seed)
    student = create_model(key.student, spec.num_classes, in_channels=spec.channels,
                           image_size=spec.image_size)
    bank = bank if bank is not None else InstanceBank()
    if request.init_pool:
        load_pool(request.init_pool, bank, spec.channels, spec.image_size)
        log(f"seeded the pool with {len(bank)} images from {request.init_pool}")
    synthesizer = create_synthesizer(key.method, teacher, student, config, image_spec(key.dataset), bank=bank,
                                     device=request.device)

    cell_dir = request.cell_dir
    cell_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(config)
    (cell_dir / "config.json").write_text(json.dumps({"cell": dataclasses.asdict(key), "config": config_dict},
                                                     indent=2))
    state_path = cell_dir / "state.pt"
    if not request.resume and state_path.exists():
        state_path.unlink()
    history = distill(teacher, student, synthesizer, config, eval_set, request.device, on_epoch=on_epoch,
                      checkpoint_path=state_path, progress=progress)
    (cell_dir / "history.json").write_text(json.dumps(dataclasses.asdict(history), indent=2))
    save_grid(synthesizer, cell_dir / "grid.png")
    save_classifier(cell_dir / "student.pt", student,
                    {"dataset": key.dataset, "arch": key.student, "num_classes": spec.num_classes,
                     "channels": spec.channels, "image_size": spec.image_size, "mean": list(spec.mean),
                     "std": list(spec.std), "accuracy": history.summary()["accuracy"],
                     "distilled_from": key.teacher, "method": key.method})
    if request.save_pool:
        save_pool(request.save_pool, bank)
    return CellResult(key, history, config_dict, float(meta.get("accuracy", float("nan"))), cell_dir,
                      time.perf_counter() - started)


def save_grid(synthesizer, path: Path, count: int = 64) -> None:
    """A PNG grid of what the method synthesizes (fresh samples for generator methods,
    the pool for inversion methods: both are what the student is trained on)."""
    from torchvision.utils import save_image

    with torch.no_grad():
        images = synthesizer.sample(count).detach().cpu().clamp(0, 1)
    save_image(images, path, nrow=8, padding=1)
