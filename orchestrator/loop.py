"""The distillation loop: plain PyTorch, no Ray, no MLflow.

Semantics of the reference benchmark (REFERENCE.md): for each of `epochs` epochs,
`ep_steps // kd_steps` rounds of [one synthesis round of `g_steps` optimisation steps,
then `kd_steps` student updates on KL(student/T || teacher/T) * T^2], then an evaluation
on the real test (or validation) set. Student: SGD momentum 0.9, weight decay 1e-4, cosine
schedule over the epochs.

The loop is generic: it logs every named loss term the synthesizer returns and never
asks which method it runs. Callers (distill, bench actors, tune trials) observe it
through `on_epoch` and can checkpoint through `checkpoint_path`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.datasets import DatasetSpec, ImageSet
from methods import ImageSpec, kd_loss, place
from orchestrator.training import evaluate


def image_spec_for(spec: DatasetSpec) -> ImageSpec:
    """What the methods need to know about a dataset's images."""
    return ImageSpec(spec.num_classes, spec.channels, spec.image_size, spec.mean, spec.std,
                     crop_padding=spec.crop_padding, hflip=spec.hflip)


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or Inf: the cell stops with this as its status."""


@dataclass
class History:
    """What a cell produced, epoch by epoch. JSON-serialisable through `asdict`."""

    accuracy: list[float] = field(default_factory=list)  # per epoch, percent
    losses: dict[str, list[float]] = field(default_factory=dict)  # per term, per-epoch mean
    images_synthesized: list[int] = field(default_factory=list)  # cumulative, per epoch
    synthesis_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch
    kd_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch
    status: str = "running"  # running | finished | failed: <why>

    @property
    def epochs_done(self) -> int:
        return len(self.accuracy)

    def summary(self) -> dict:
        done = self.epochs_done
        synth = self.synthesis_seconds[-1] if done else 0.0
        images = self.images_synthesized[-1] if done else 0
        return {
            "status": self.status,
            "accuracy": self.accuracy[-1] if done else float("nan"),
            "best_accuracy": max(self.accuracy) if done else float("nan"),
            "epochs": done,
            "images_synthesized": images,
            "synthesis_seconds": synth,
            "kd_seconds": self.kd_seconds[-1] if done else 0.0,
            "synthesis_images_per_second": images / synth if synth > 0 else float("nan"),
        }


def _check_finite(terms: dict[str, float], where: str) -> None:
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(f"non-finite loss {', '.join(bad)} in {where}")


class _Means:
    """Running per-epoch means of named loss terms."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, float], prefix: str) -> None:
        for key, value in terms.items():
            name = f"{prefix}{key}"
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class Trainer:
    """The student side of a cell: KD steps on batches from any source, per-epoch
    cosine step and evaluation. Used in-process by `distill` and inside Ray trainer
    actors, so both run the same KD code."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, config, eval_set: ImageSet,
                 device="cpu"):
        self.teacher, self.student, self.config, self.eval_set = teacher.eval(), place(student, device), config, eval_set
        self.device = device
        self.image_spec = image_spec_for(eval_set.spec)
        self.optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)

    def kd_steps(self, sample: Callable[[int], torch.Tensor]) -> dict[str, float]:
        """`config.kd_steps` student updates on `sample(batch_size)` ([0, 1] images)."""
        cfg, norm = self.config, self.image_spec.normalize
        self.student.train()
        total = 0.0
        for _ in range(cfg.kd_steps):
            x = norm(sample(cfg.batch_size))
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = kd_loss(cfg.kd_criterion, self.student(x), t_logits, cfg.T)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return {"loss": total / cfg.kd_steps}

    def end_epoch(self) -> float:
        self.scheduler.step()
        return evaluate(self.student, self.eval_set, self.device)

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class EpochLog:
    """Accumulates one cell's per-epoch record into a History (shared by the in-process
    loop and the Ray driver)."""

    def __init__(self, history: History):
        self.history = history
        self.means = _Means()

    def add(self, terms: dict[str, float], prefix: str, where: str) -> None:
        _check_finite(terms, where)
        self.means.add(terms, prefix)

    def close_epoch(self, accuracy: float, images: int, synth_time: float, kd_time: float, epochs: int) -> dict:
        h, epoch = self.history, self.history.epochs_done
        h.accuracy.append(accuracy)
        means = self.means.means()
        for key, value in means.items():
            h.losses.setdefault(key, [float("nan")] * epoch).append(value)
        h.images_synthesized.append(int(images))
        h.synthesis_seconds.append(synth_time)
        h.kd_seconds.append(kd_time)
        if h.epochs_done == epochs:
            h.status = "finished"
        self.means = _Means()
        return {"accuracy": accuracy, **means, "synthesis_seconds": synth_time, "kd_seconds": kd_time,
                "images_synthesized": int(images)}


def distill(teacher: torch.nn.Module, student: torch.nn.Module, synthesizer, config, eval_set: ImageSet,
            device="cpu", *, on_epoch: Callable[[int, dict], None] | None = None,
            checkpoint_path: str | Path | None = None, progress=None) -> History:
    """Runs (or resumes from `checkpoint_path`) one cell's distillation in this process.

    Never raises on NaN/Inf: the history's status says "failed: ..." instead.
    `progress`, if given, is called as progress(phase, done, total) for a status bar.
    """
    trainer = Trainer(teacher, student, config, eval_set, device)
    history = History()
    state = None
    if checkpoint_path and Path(checkpoint_path).exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("config") != asdict(config):
            state = None  # a different config under the same cell key: start over
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        synthesizer.load_state_dict(state["synthesizer"])
        history = History(**state["history"])
        torch.set_rng_state(state["rng"])
    log = EpochLog(history)
    rounds = rounds_per_epoch(config)
    synth_time = history.synthesis_seconds[-1] if history.epochs_done else 0.0
    kd_time = history.kd_seconds[-1] if history.epochs_done else 0.0
    try:
        for epoch in range(history.epochs_done, config.epochs):
            for r in range(rounds):
                where = f"epoch {epoch + 1}, round {r + 1}"
                if progress:
                    progress("synthesis", epoch * rounds + r, config.epochs * rounds)
                tick = time.perf_counter()
                result = synthesizer.synthesize()
                synth_time += time.perf_counter() - tick
                log.add(result.losses, "synth/", f"synthesis ({where})")
                if progress:
                    progress("kd", epoch * rounds + r, config.epochs * rounds)
                tick = time.perf_counter()
                kd = trainer.kd_steps(synthesizer.sample)
                kd_time += time.perf_counter() - tick
                log.add(kd, "kd/", f"KD ({where})")
            metrics = log.close_epoch(trainer.end_epoch(), synthesizer.images_synthesized, synth_time, kd_time,
                                      config.epochs)
            if checkpoint_path:
                save_state(checkpoint_path, {"trainer": trainer.state_dict(),
                                             "synthesizer": synthesizer.state_dict(),
                                             "history": asdict(history), "rng": torch.get_rng_state(),
                                             "config": asdict(config)})
            if on_epoch:
                on_epoch(epoch + 1, metrics)
    except NonFiniteLoss as exc:
        history.status = f"failed: {exc}"
    return history


def rounds_per_epoch(config) -> int:
    return max(config.ep_steps // config.kd_steps, 1)


def save_state(path, state: dict) -> None:
    """torch.save to a temp file then rename: a kill mid-save keeps the previous state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
