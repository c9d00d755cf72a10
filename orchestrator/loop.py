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

from benchmarks.datasets import ImageSet
from methods import kd_loss
from orchestrator.training import evaluate


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


def distill(teacher: torch.nn.Module, student: torch.nn.Module, synthesizer, config, eval_set: ImageSet,
            device="cpu", *, on_epoch: Callable[[int, dict], None] | None = None,
            checkpoint_path: str | Path | None = None, progress=None) -> History:
    """Runs (or resumes from `checkpoint_path`) one cell's distillation; never raises on NaN.

    `progress`, if given, is called as progress(phase, done, total) for a status bar.
    """
    spec = eval_set.spec
    mean, std = spec.mean, spec.std

    def norm(x):
        mean_t = torch.as_tensor(mean, device=x.device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, device=x.device).view(1, -1, 1, 1)
        return (x - mean_t) / std_t

    teacher.eval()
    student.to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    history = History()
    start_epoch = 0
    if checkpoint_path and Path(checkpoint_path).exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        synthesizer.load_state_dict(state["synthesizer"])
        history = History(**state["history"])
        torch.set_rng_state(state["rng"])
        start_epoch = history.epochs_done

    rounds = max(config.ep_steps // config.kd_steps, 1)
    synth_time = history.synthesis_seconds[-1] if history.epochs_done else 0.0
    kd_time = history.kd_seconds[-1] if history.epochs_done else 0.0
    try:
        for epoch in range(start_epoch, config.epochs):
            means = _Means()
            for r in range(rounds):
                if progress:
                    progress("synthesis", epoch * rounds + r, config.epochs * rounds)
                tick = time.perf_counter()
                result = synthesizer.synthesize()
                synth_time += time.perf_counter() - tick
                _check_finite(result.losses, f"synthesis (epoch {epoch + 1}, round {r + 1})")
                means.add(result.losses, "synth/")
                if progress:
                    progress("kd", epoch * rounds + r, config.epochs * rounds)
                tick = time.perf_counter()
                for _ in range(config.kd_steps):
                    x = synthesizer.sample(config.batch_size)
                    with torch.no_grad():
                        t_logits = teacher(norm(x))
                    loss = kd_loss(config.kd_criterion, student(norm(x)), t_logits, config.T)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    means.add({"loss": loss.item()}, "kd/")
                kd_time += time.perf_counter() - tick
                _check_finite({"kd/loss": means.sums["kd/loss"]}, f"KD (epoch {epoch + 1}, round {r + 1})")
            scheduler.step()
            accuracy = evaluate(student, eval_set, device)
            history.accuracy.append(accuracy)
            for key, value in means.means().items():
                history.losses.setdefault(key, [float("nan")] * epoch).append(value)
            history.images_synthesized.append(int(synthesizer.images_synthesized))
            history.synthesis_seconds.append(synth_time)
            history.kd_seconds.append(kd_time)
            if epoch + 1 == config.epochs:
                history.status = "finished"
            if checkpoint_path:
                _save(checkpoint_path, student, optimizer, scheduler, synthesizer, history)
            if on_epoch:
                on_epoch(epoch + 1, {"accuracy": accuracy, **means.means(),
                                     "synthesis_seconds": synth_time, "kd_seconds": kd_time,
                                     "images_synthesized": int(synthesizer.images_synthesized)})
    except NonFiniteLoss as exc:
        history.status = f"failed: {exc}"
    if history.status == "running" and history.epochs_done == config.epochs:
        history.status = "finished"
    return history


def _save(path, student, optimizer, scheduler, synthesizer, history: History) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "synthesizer": synthesizer.state_dict(),
             "history": asdict(history), "rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save keeps the previous epoch's checkpoint
