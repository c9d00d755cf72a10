"""The round loop: the one distillation loop of the project (plain PyTorch, no Ray, no MLflow).

For each of `epochs` epochs, `ep_steps // kd_steps` rounds of [one synthesis round of
`g_steps` optimisation steps, then `kd_steps` student updates on the KD loss (KL(teacher/T
|| student/T) * T^2; L1 on logits for DFAD; `kd_criterion=kl+crd` adds CRD, methods/crd.py)],
then an evaluation of every student (see below). The
first `warmup_epochs` epochs only synthesize (Fast-DFKD and NAYER warm their generator up before KD starts). Students: SGD
momentum 0.9, weight decay 1e-4, cosine schedule over the epochs. After every epoch the
whole state is checkpointed, so a killed cell continues from its last finished epoch.
Epochs before the last score a fixed 2,000-image subset of the evaluation split (the curve);
the last epoch scores all of it (the reported number).

A method whose config asks for one-stage rounds (`one_stage=true`, DFAD and ZSKT; see
docs/methods.md) replaces the round's synthesis round and first `g_steps` KD steps by as many
joint steps (`Strategy.joint_steps`): the generator's forward, one KD step whose backward
also yields the gradient of the student's loss to the images, and the generator's step on
that gradient reversed. The round's other KD steps follow as usual.

Where the work runs is a `Strategy`, not a second loop: `InProcess` (below; `distill` and
`tune` trials) holds the synthesizer and the students in this process; the Ray strategy
(orchestrator/runtime/driver.py; `bench`) drives a synthesizer actor, trainer actors and a
store actor. The loop never asks which method it runs; it logs every named loss term.

    loop = RoundLoop(InProcess(synthesizer, [trainer]), config, state_path=cell_dir / "state.pt")
    loop.restore()                    # resume, if a state with the same config is there
    histories = loop.run(on_epoch=lambda student, epoch, metrics: print(epoch, metrics))
"""
from __future__ import annotations

import abc
import math
import os
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.datasets import ImageSet
from methods import ConfigError, KDObjective, place
from methods.config import same_identity
from methods.guided import draw_guide
from models import inference_copy
from orchestrator.core.training import evaluate


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or Inf: the affected cells stop with this as their status."""


@dataclass
class History:
    """What a cell produced, epoch by epoch. JSON-serialisable through `asdict`."""

    accuracy: list[float] = field(default_factory=list)  # per epoch, percent
    losses: dict[str, list[float]] = field(default_factory=dict)  # per term, per-epoch mean
    images_synthesized: list[int] = field(default_factory=list)  # cumulative, per epoch
    synthesis_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch
    kd_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch
    eval_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch: cosine step + evaluation
    checkpoint_seconds: list[float] = field(default_factory=list)  # cumulative, per epoch: writing the state
    status: str = "running"  # running | finished | failed: <why>

    @property
    def epochs_done(self) -> int:
        return len(self.accuracy)

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    def epoch_metrics(self, index: int) -> dict:
        """The metrics of epoch `index` (0-based), as reported when it closed."""
        losses = {k: v[index] for k, v in self.losses.items() if index < len(v) and not math.isnan(v[index])}
        return {"accuracy": self.accuracy[index], **losses, "synthesis_seconds": self.synthesis_seconds[index],
                "kd_seconds": self.kd_seconds[index], "images_synthesized": self.images_synthesized[index]}

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
            "eval_seconds": _last(self.eval_seconds, done),
            "checkpoint_seconds": _last(self.checkpoint_seconds, done),
            "synthesis_images_per_second": images / synth if synth > 0 else float("nan"),
        }


# The per-epoch accuracy curve is scored on this many images of the evaluation split (the
# same ones in every cell and epoch); the last epoch, the number every table reports, on
# all of it. Scoring all 10,000 test images every epoch was 13-18% of a cell's time
# (docs/results/speed.md); 2,000 images put a point of the curve within about 1 point (one
# standard error at 80%).
CURVE_IMAGES = 2000


def curve_subset(data: ImageSet, n: int = CURVE_IMAGES) -> ImageSet:
    """A fixed subset of `n` images, drawn independently of any run's seed."""
    if len(data) <= n:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.subset(order[:n].sort().values)


class Trainer:
    """The student side of a cell: KD steps on batches from any source, per-epoch cosine
    step and evaluation. Runs in this process (`InProcess`) or inside a Ray trainer actor:
    the same KD code either way."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, config, eval_set: ImageSet,
                 image_spec, device="cpu"):
        self.teacher, self.student, self.config, self.eval_set = teacher.eval(), place(student, device), config, eval_set
        # The frozen teacher's KD targets come from its inference copy (models/fuse.py): conv ->
        # BN pairs folded (the same outputs to float rounding, about 1.2x faster for a wrn16_2
        # teacher here, more for post-activation ResNets, whose every BN folds), and on a CPU
        # each ReLU and residual add done inside the convolution before it (bit for bit).
        self.kd_teacher = inference_copy(self.teacher)
        self.curve_set = curve_subset(eval_set)
        self.device, self.image_spec = device, image_spec
        # The KD criterion; with "+crd" it owns embedding heads (trained by the student's
        # optimizer, in the same parameter group) and a queue of teacher embeddings.
        self.objective = KDObjective(config.kd_criterion, config.T, self.student.num_features,
                                     self.teacher.num_features, device=device)
        self.optimizer = torch.optim.SGD([*student.parameters(), *self.objective.parameters()], lr=config.lr,
                                         momentum=0.9, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)
        self.guide_images: torch.Tensor | None = None  # the cell's guide set (attach_guide), for guide_mix
        self.guide_labels: torch.Tensor | None = None
        # Optimizer steps taken so far, and the last score with the step count and split it
        # was taken at: a student that no step changed (a warm-up epoch: synthesis only,
        # with the student in eval mode) is not scored again on the same split.
        self.updates = 0
        self.last_score: tuple[int, ImageSet, float] | None = None

    def attach_guide(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The cell's guide set (float [0, 1] images, labels): what `guide_mix` mixes in."""
        self.guide_images = images.to(device=self.device, dtype=torch.float32)
        self.guide_labels = labels.to(device=self.device, dtype=torch.long)

    def mix_guide(self, x: torch.Tensor) -> torch.Tensor:
        """A KD batch ([0, 1]) with its last round(guide_mix * B) images replaced by guide
        images through the dataset's crop and flip (the naive mixing baseline of guided
        inversion); the batch itself when guide_mix is 0 (no random draw)."""
        n = round(self.config.guide_mix * len(x))
        if n == 0:
            return x
        if self.guide_images is None:
            raise ConfigError(f"guide_mix={self.config.guide_mix} mixes guide images into KD batches, but the "
                              "cell has no guide set; give it one (--guide KIND:K)")
        guide, _ = draw_guide(self.guide_images, self.guide_labels, n, self.image_spec)
        return torch.cat([x[:len(x) - n], guide.to(x.dtype)])

    def kd_steps(self, sample: Callable[[int], torch.Tensor], steps: int | None = None) -> dict[str, float]:
        """`steps` (default `config.kd_steps`) student updates on `sample(batch_size)` ([0, 1]
        images). Reports the mean total loss ("loss") and the mean of each extra term (e.g.
        "crd"); nothing for 0 steps."""
        cfg = self.config
        steps = cfg.kd_steps if steps is None else steps
        self.student.train()
        # Summed on the device (no host sync per step), in float64 and in step order: the
        # same sums as adding the steps' Python floats one by one.
        sums: dict[str, torch.Tensor] = {}
        for _ in range(steps):
            x = self.image_spec.normalize(self.mix_guide(sample(cfg.batch_size)))
            with torch.no_grad():
                t_out = self.kd_teacher(x, return_features=self.objective.uses_features)
            terms = self._update(x, t_out)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double()
        return {name: value.item() / steps for name, value in sums.items()}

    def joint_step(self, images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """The student's half of a one-stage joint step (methods/generative.py): one KD step
        on the generator's `images` ([0, 1]) whose backward also yields d loss / d images,
        through the student and the teacher, for the generator. The teacher stays frozen:
        it runs with a graph to its input, but the backward reaches only the student's
        parameters and the images. Returns (loss terms, image gradient)."""
        self.student.train()
        images = images.detach().to(self.device).requires_grad_(True)
        x = self.image_spec.normalize(images)
        t_out = self.teacher(x, return_features=self.objective.uses_features)
        terms = self._update(x, t_out, [images])
        return {name: value.item() for name, value in terms.items()}, images.grad

    def _update(self, x: torch.Tensor, t_out, also: list | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step on the KD loss of normalised `x` against teacher outputs
        `t_out`. With `also`, the backward reaches only the optimizer's parameters and those
        tensors (a teacher with a graph gets no gradients); without, every leaf in the graph."""
        features = self.objective.uses_features
        s_out = self.student(x, return_features=features)
        if features:  # (logits, penultimate features) from each network
            terms = self.objective(s_out[0], t_out[0], s_out[1], t_out[1])
        else:
            terms = self.objective(s_out, t_out)
        self.optimizer.zero_grad(set_to_none=True)
        if also is None:
            terms["loss"].backward()
        else:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            terms["loss"].backward(inputs=[*params, *also])
        self.optimizer.step()
        self.updates += 1
        return terms

    def end_epoch(self) -> float:
        with warnings.catch_warnings():  # after a warm-up epoch no optimizer step came first, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        last = self.scheduler.last_epoch >= self.config.epochs  # counts resumed epochs too
        split = self.eval_set if last else self.curve_set
        if self.last_score is not None and self.last_score[0] == self.updates and self.last_score[1] is split:
            return self.last_score[2]  # unchanged student, same images: the same number
        accuracy = evaluate(self.student, split, self.device)
        self.last_score = (self.updates, split, accuracy)
        return accuracy

    def state_dict(self) -> dict:
        state = {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        objective = self.objective.state()
        if objective:  # only with "+crd": a plain criterion's state stays what it always was
            state["objective"] = objective
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.last_score = None  # new weights
        if self.objective.uses_features:
            self.objective.load_state(state["objective"])


@dataclass
class RoundOutput:
    """What one synthesis round reports to the loop."""

    losses: dict[str, float]
    images_synthesized: int  # cumulative
    seconds: float  # synthesis
    kd_sample_seconds: float = 0.0  # drawing the round's fresh KD images, booked as KD time
    # A one-stage round: its first `joint_steps` KD steps were joint steps; per student,
    # their mean loss terms and the seconds of the student's half (booked as KD time).
    joint_steps: int = 0
    joint_kd: dict[int, tuple[dict[str, float], float]] = field(default_factory=dict)


class Strategy(abc.ABC):
    """Where a cell's synthesis and KD run. Student `i` is the i-th student of the stream
    (one in `distill`, `tune` and the bench's paper mode; all students of a teacher in the
    bench's shared mode)."""

    uses_student: bool  # the synthesizer plays against the students (adversarial terms)
    one_stage: bool = False  # distilling rounds are joint steps (the method's `joint_steps`)

    @abc.abstractmethod
    def synthesize(self, publish: bool, feed_kd: bool) -> RoundOutput:
        """One synthesis round. `publish`: refresh the synthesizer's view of the students
        first; `feed_kd`: KD steps follow (False in warm-up epochs)."""

    def joint_steps(self, students: list[int]) -> RoundOutput:
        """A one-stage round's joint steps, each one generator step and one KD step of the
        (single) student from one forward and one backward: the synthesizer's
        `begin_joint()`, the trainer's `joint_step()`, the synthesizer's `end_joint()`.
        Then the fresh KD images of the round's remaining KD steps are drawn."""
        raise NotImplementedError(f"{type(self).__name__} has no one-stage rounds")

    @abc.abstractmethod
    def kd_round(self, students: list[int], steps: int) -> list[tuple[dict[str, float], float]]:
        """`steps` updates of each listed student: (loss terms, seconds) per student."""

    @abc.abstractmethod
    def end_epoch(self, students: list[int]) -> list[float]:
        """Cosine step and evaluation of each listed student: accuracies in percent."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to continue after the last epoch, random states included."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class InProcess(Strategy):
    """Synthesizer and students in this process: the synthesizer holds the live student
    objects, so there is nothing to publish."""

    def __init__(self, synthesizer, trainers: list[Trainer]):
        self.synthesizer, self.trainers = synthesizer, trainers
        self.uses_student = bool(synthesizer.uses_student)
        self.one_stage = bool(synthesizer.one_stage)

    def synthesize(self, publish: bool, feed_kd: bool) -> RoundOutput:
        tick = time.perf_counter()
        result = self.synthesizer.synthesize()
        return RoundOutput(result.losses, self.synthesizer.images_synthesized, time.perf_counter() - tick)

    def joint_steps(self, students):
        (i,) = students  # RoundLoop refuses one-stage rounds with several students
        synth, trainer = self.synthesizer, self.trainers[i]
        steps = synth.joint_steps(synth.config)
        synth_seconds = kd_seconds = 0.0
        sums: dict[str, float] = {}
        for k in range(steps):
            # The generator's forward and backward are synthesis time; the student's step
            # (teacher and student forward, backward through both) is KD time.
            tick = time.perf_counter()
            images = synth.begin_joint()
            began = time.perf_counter()
            terms, grad = trainer.joint_step(images)
            stepped = time.perf_counter()
            losses = synth.end_joint(grad, terms["loss"], closes_round=k == steps - 1)
            synth_seconds += began - tick + time.perf_counter() - stepped
            kd_seconds += stepped - began
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
        kd = {name: value / steps for name, value in sums.items()}
        return RoundOutput(losses, synth.images_synthesized, synth_seconds, joint_steps=steps,
                           joint_kd={i: (kd, kd_seconds)})

    def kd_round(self, students, steps):
        out = []
        for i in students:
            tick = time.perf_counter()
            losses = self.trainers[i].kd_steps(self.synthesizer.sample, steps)
            out.append((losses, time.perf_counter() - tick))
        return out

    def end_epoch(self, students):
        return [self.trainers[i].end_epoch() for i in students]

    def state_dict(self) -> dict:
        return {"synthesizer": self.synthesizer.state_dict(), "trainers": [t.state_dict() for t in self.trainers],
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.synthesizer.load_state_dict(state["synthesizer"])
        for trainer, saved in zip(self.trainers, state["trainers"]):
            trainer.load_state_dict(saved)
        torch.set_rng_state(state["rng"])


class _Means:
    """Running per-epoch means of named loss terms."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, float], prefix: str, where: str) -> None:
        bad = [f"{prefix}{k}" for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} in {where}")
        for key, value in terms.items():
            name = f"{prefix}{key}"
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _step_mean(a: dict[str, float], n_a: int, b: dict[str, float], n_b: int) -> dict[str, float]:
    """The per-step mean of terms averaged over `n_a` steps (`a`) and `n_b` steps (`b`)."""
    return {k: (a.get(k, 0.0) * n_a + b.get(k, 0.0) * n_b) / (n_a + n_b) for k in {**a, **b}}


def _close_epoch(h: History, means: dict[str, float], accuracy: float, images: int, synth: float, kd: float,
                 evals: float, epochs: int) -> dict:
    epoch = h.epochs_done
    h.accuracy.append(accuracy)
    for key in set(h.losses) | set(means):  # a term missing this epoch (warm-up: no KD) is NaN
        h.losses.setdefault(key, [float("nan")] * epoch).append(means.get(key, float("nan")))
    h.images_synthesized.append(int(images))
    h.synthesis_seconds.append(synth)
    h.kd_seconds.append(kd)
    h.eval_seconds.append(evals)
    if h.epochs_done == epochs:
        h.status = "finished"
    return h.epoch_metrics(epoch)


class RoundLoop:
    """Runs (or resumes) one synthesis stream: a strategy and its students' histories.

    A NaN/Inf in synthesis fails every student of the stream; one in a student's KD fails
    that student only (the others go on). Other exceptions (an actor died, Ctrl-C) propagate,
    and `histories` keeps every finished epoch for the caller to record.
    """

    def __init__(self, strategy: Strategy, config, n_students: int = 1, state_path: str | Path | None = None,
                 publish_every: int = 1):
        self.strategy, self.config, self.n = strategy, config, n_students
        self.state_path = Path(state_path) if state_path else None
        self.publish_every = max(int(publish_every), 1)
        check_one_stage_students(strategy.one_stage, n_students)
        self.histories = [History() for _ in range(n_students)]

    def restore(self) -> int:
        """Continues from `state_path` when it holds a state of this config; returns the
        epochs restored (0: starting fresh)."""
        state = load_matching_state(self.state_path, self.config, self.n)
        if state is None:
            return 0
        self.strategy.load_state_dict(state["strategy"])
        self.histories = [History(**h) for h in state["histories"]]
        return min(h.epochs_done for h in self.histories)

    def run(self, on_epoch: Callable[[int, int, dict], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None,
            stop: threading.Event | None = None) -> list[History]:
        """`on_epoch(student, epoch, metrics)` after each checkpointed epoch;
        `progress(phase, rounds done, rounds total)` before each synthesis and KD phase;
        `stop` set: raises InterruptedError at the next round."""
        cfg, hs = self.config, self.histories
        rounds = rounds_per_epoch(cfg)
        live = [i for i, h in enumerate(hs) if not h.failed and h.status != "finished"]
        start = min((hs[i].epochs_done for i in live), default=cfg.epochs)
        synth_time = hs[0].synthesis_seconds[start - 1] if start else 0.0
        kd_time = [h.kd_seconds[start - 1] if start else 0.0 for h in hs]
        eval_time = _last(hs[0].eval_seconds, start)
        checkpoint_time = _last(hs[0].checkpoint_seconds, start)
        images = hs[0].images_synthesized[start - 1] if start else 0
        for epoch in range(start, cfg.epochs):
            means = [_Means() for _ in hs]
            distilling = epoch >= cfg.warmup_epochs
            for r in range(rounds):
                if stop is not None and stop.is_set():
                    raise InterruptedError("interrupted")
                where, step = f"epoch {epoch + 1}, round {r + 1}", epoch * rounds + r
                if progress:
                    progress("synthesis", step, cfg.epochs * rounds)
                publish = self.strategy.uses_student and step % self.publish_every == 0 and len(live) == self.n
                if distilling and self.strategy.one_stage:  # generator and student steps merged
                    out = self.strategy.joint_steps(live)
                else:
                    out = self.strategy.synthesize(publish, feed_kd=distilling)
                synth_time, images = synth_time + out.seconds, out.images_synthesized
                try:
                    for i in live:
                        means[i].add(out.losses, "synth/", f"synthesis ({where})")
                except NonFiniteLoss as exc:
                    self._fail(live, exc)
                    return hs
                if not distilling:
                    continue
                if progress:
                    progress("kd", step, cfg.epochs * rounds)
                remaining = cfg.kd_steps - out.joint_steps
                for i, (losses, seconds) in zip(list(live), self.strategy.kd_round(live, remaining)):
                    if out.joint_steps:  # the round's KD steps: its joint steps, then the others
                        joint_losses, joint_seconds = out.joint_kd[i]
                        losses = _step_mean(joint_losses, out.joint_steps, losses, remaining)
                        seconds += joint_seconds
                    kd_time[i] += seconds + out.kd_sample_seconds
                    try:
                        means[i].add(losses, "kd/", f"KD ({where})")
                    except NonFiniteLoss as exc:
                        self._fail([i], exc)
                        live.remove(i)
                if not live:
                    return hs
            tick = time.perf_counter()
            accuracies = self.strategy.end_epoch(live)
            eval_time += time.perf_counter() - tick
            metrics = {i: _close_epoch(hs[i], means[i].means(), acc, images, synth_time, kd_time[i], eval_time,
                                       cfg.epochs) for i, acc in zip(live, accuracies)}
            for i in live:  # the state written now counts the writes before it; the history, this one too
                hs[i].checkpoint_seconds.append(checkpoint_time)
            tick = time.perf_counter()
            self.checkpoint()
            checkpoint_time += time.perf_counter() - tick
            for i in live:
                hs[i].checkpoint_seconds[-1] = checkpoint_time
            for i, m in metrics.items():
                if on_epoch:
                    on_epoch(i, epoch + 1, m)
        return hs

    def checkpoint(self) -> None:
        if self.state_path:
            save_state(self.state_path, {"strategy": self.strategy.state_dict(),
                                         "histories": [asdict(h) for h in self.histories],
                                         "config": asdict(self.config)})

    def _fail(self, students: list[int], exc: Exception) -> None:
        for i in students:
            self.histories[i].status = f"failed: {exc}"


def check_one_stage_students(one_stage: bool, n_students: int) -> None:
    """One-stage rounds need a stream of one student: the generator of a shared stream plays
    against the students' mean logits, which is no student's own KD loss, so there is no
    single loss for a joint step to share."""
    if one_stage and n_students > 1:
        raise ConfigError(f"one_stage=true trains the generator on one student's KD loss; a stream of "
                          f"{n_students} students (shared mode) has none: use --mode paper")


def load_matching_state(path: str | Path | None, config, n_students: int) -> dict | None:
    """The resume state at `path` if it was written under this config for as many
    students; None otherwise (a different config under the same cell starts over)."""
    if not (path and Path(path).exists()):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated by a full disk, not a state file, ...: say which file and why
        from orchestrator.core.errors import UsageError

        raise UsageError(f"cannot read the resume state {path} ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:160]}); delete it to start the cell over") from None
    # A state saved before a late config field existed (methods/config.py: `late`) matches
    # today's config with that field at its default.
    if not same_identity(state.get("config"), config) or len(state.get("histories", [])) != n_students:
        return None
    return state


def _last(cumulative: list[float], epochs: int) -> float:
    """A cumulative figure after `epochs` epochs (0 before the first; 0 for a state written
    before the figure was recorded)."""
    return cumulative[epochs - 1] if epochs and len(cumulative) >= epochs else 0.0


def rounds_per_epoch(config) -> int:
    return max(config.ep_steps // config.kd_steps, 1)


def steps_done(config, rounds: int, phase: str = "synthesis") -> int:
    """The synthesis and KD steps a cell has taken when its round number `rounds` (counted
    from 0 over all epochs) begins `phase` ("synthesis" or "kd"); with `rounds` = epochs x
    rounds_per_epoch, the cell's total. Warm-up epochs take synthesis steps only.

    The bench's progress unit. Rounds were: a round of DAFL (1 + 5 steps) takes ~7 s on a
    2-core Zen 3, one of CMI (20 + 50) ~100 s, so a bar over rounds that started on DAFL
    promised a 40-minute bench in 14. A step of the default cells takes 0.8-1.4 s there
    (docs/results/speed.md, session 14)."""
    warm = min(rounds, config.warmup_epochs * rounds_per_epoch(config))
    done = rounds * config.g_steps + (rounds - warm) * config.kd_steps
    if phase == "kd":  # this round's synthesis is done (a warm-up round has no KD phase)
        done += config.g_steps
    return done


def cell_steps(config) -> int:
    """All the synthesis and KD steps of a cell: the length of a progress bar over it."""
    return steps_done(config, config.epochs * rounds_per_epoch(config))


def epochs_done(state_path: Path) -> int:
    """Epochs a cell's resume state has finished (0 when there is none)."""
    if not Path(state_path).exists():
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return min((len(h["accuracy"]) for h in state.get("histories", [])), default=0)


def save_state(path, state: dict) -> None:
    """torch.save to a temp file then rename: a kill mid-save keeps the previous state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
