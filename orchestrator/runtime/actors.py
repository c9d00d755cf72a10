"""The Ray actors of a synthesis stream: a synthesizer pushes into the stream's store,
trainers pull from it.

    SynthesizerActor  one per stream: the teacher, the method's synthesizer and replicas of
                      the students it plays against (adversarial terms). Its bank is the
                      store; a method that trains on fresh KD batches (`fresh_kd_batches`)
                      also pushes each round's KD images there. In a one-stage round it
                      runs the generator's half of each joint step (begin_joint, end_joint).
    TrainerActor      one per student: the core `Trainer` (the KD code `distill` runs),
                      fed from the store.

Both get their cell in `setup`, built from the stream's `CellSpec` with the core cell
builder, so every process gets the same config, teacher, student initialisation and eval
set as `distill`. The driver keeps an actor whose stream finished for the next stream of the
same shape (runtime/driver.py: `ActorSlots`) and calls `setup` again: its process has torch
imported and the teacher loaded already. Everything a cell draws is seeded in `setup`
(`make_student` seeds), so a cell's history does not depend on what the process ran before
(tested). Only numpy arrays and small dicts cross process boundaries. `setup` calls
`torch.set_num_threads` because Ray reuses worker processes.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch

from methods import from_uint8, place, to_uint8
from orchestrator.core.cell import (CellSpec, grid_images, load_teacher, make_student, make_synthesizer,
                                    make_trainer, write_cell_files)
from orchestrator.runtime.store import StoreBank, _tensor


def _to_numpy(state: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _from_numpy(state: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}


def _rng_state() -> torch.Tensor:
    return torch.get_rng_state()  # a tensor: the state file loads with weights_only=True


class _ActorProcess:
    def __init__(self):
        # torch.optim imports torch._dynamo on the first optimizer a process builds (1.2 s on
        # the Intel machine, 2.6 s on the Zen 3 one: most of a new actor's setup). Imported when
        # the actor is created, it loads while the driver still prepares (the bench creates its
        # actors ahead of the first stream, ActorSlots.prestart); not at module import, since
        # the driver imports this module too and never builds an optimizer.
        import torch._dynamo  # noqa: F401


@ray.remote
class SynthesizerActor(_ActorProcess):
    def setup(self, spec: CellSpec, students: list[str], store, device: str = "cpu",
              threads: int = 1) -> tuple[bool, bool]:
        """Takes the cell of a (new) stream; returns whether the method plays against the
        student and whether its rounds are one-stage."""
        vars(self).clear()  # the last cell's networks go before this one's are built
        torch.set_num_threads(threads)
        self.spec, self.device = spec, device
        teacher, _ = load_teacher(spec.teacher_ckpt, spec.key.dataset, device)
        # Seeded as `distill` seeds its process: the replica is drawn (like the student
        # there) right before the synthesizer, so both start from the same random state.
        self.replicas = [place(make_student(spec, arch), device) for arch in students]
        self.bank = StoreBank(store)
        self.synth = make_synthesizer(spec, teacher, self.replicas, self.bank, device)
        self.fresh = spec.method.fresh_kd_batches
        self._joint_seconds = 0.0  # begin_joint's, reported by end_joint
        return bool(self.synth.uses_student), bool(self.synth.one_stage)

    def round(self, student_states: list[dict] | None, feed_kd: bool) -> dict:
        """One synthesis round; a fresh-batch method then pushes the round's KD images."""
        if student_states:
            for replica, state in zip(self.replicas, student_states):
                replica.load_state_dict(_from_numpy(state))
        tick = time.perf_counter()
        result = self.synth.synthesize()
        seconds = time.perf_counter() - tick
        # Drawing KD images is KD-side work in `distill` (the trainer calls `sample`): it is
        # reported apart and booked as KD time, so the two splits compare.
        return {"losses": result.losses, "images_synthesized": self.synth.images_synthesized,
                "seconds": seconds, "kd_sample_seconds": self.feed(self.spec.config.kd_steps) if feed_kd else 0.0}

    def feed(self, steps: int) -> float:
        """A fresh-batch method pushes the images of `steps` KD steps; returns the seconds."""
        tick = time.perf_counter()
        if self.fresh and steps > 0:
            # The images this round's KD steps train on, as many as they consume; each
            # trainer uses each batch once. Drawn one KD batch at a time, as `distill` draws
            # them: one large draw allocates hundreds of MB of activations per round on a CPU.
            batch = self.spec.config.batch_size
            self.bank.add(torch.cat([to_uint8(self.synth.sample(batch)).cpu() for _ in range(steps)]))
            # waited for: the trainers' next pull sees this round
        return time.perf_counter() - tick

    # A one-stage joint step: begin_joint here, TrainerActor.joint_step, end_joint here. The
    # images and their gradient travel as float32 (not uint8 like KD batches): the gradient
    # must belong to exactly the images the generator made.
    def begin_joint(self) -> np.ndarray:
        tick = time.perf_counter()
        images = self.synth.begin_joint().float().cpu().numpy()
        self._joint_seconds = time.perf_counter() - tick
        return images

    def end_joint(self, step: dict, closes_round: bool) -> dict:
        """`step`: the trainer's `joint_step` answer. Reports the generator's terms and the
        seconds of its forward and backward (synthesis time)."""
        tick = time.perf_counter()
        losses = self.synth.end_joint(_tensor(step["grad"]), step["losses"]["loss"], closes_round)
        return {"losses": losses, "images_synthesized": self.synth.images_synthesized,
                "seconds": self._joint_seconds + time.perf_counter() - tick}

    def state(self) -> dict:
        return {"synthesizer": self.synth.state_dict(), "rng": _rng_state()}

    def load_state(self, state: dict) -> None:
        self.synth.load_state_dict(state["synthesizer"])
        torch.set_rng_state(state["rng"])

    def grid(self, count: int = 64) -> torch.Tensor:
        return grid_images(self.synth, count)


@ray.remote
class TrainerActor(_ActorProcess):
    def setup(self, spec: CellSpec, store, device: str = "cpu", threads: int = 1) -> None:
        """Takes the cell of a (new) stream: its student, drawn from the cell's seed."""
        vars(self).clear()
        torch.set_num_threads(threads)
        self.spec, self.device = spec, device
        self.trainer = make_trainer(spec, make_student(spec), device)
        self.bank = StoreBank(store)
        self.fresh = spec.method.fresh_kd_batches

    def kd_round(self, steps: int) -> dict:
        tick = time.perf_counter()
        cfg, spec = self.spec.config, self.spec
        if steps == 0:  # a one-stage round whose KD steps were all joint steps
            return {"losses": {}, "seconds": 0.0}
        if self.fresh:
            # The store holds exactly this round's fresh images: take them all once
            # (distinct, shuffled) and use each batch once, as fresh samples are.
            batches = iter(from_uint8(self.bank.sample(steps * cfg.batch_size)).split(cfg.batch_size))
            sample = lambda n: next(batches).to(self.device)  # noqa: E731
        else:
            # Every batch of the round is requested at once: the store answers them in order
            # (the same draws as one request at a time, since nothing is added to the bank
            # during KD), and the KD steps never wait for a round trip.
            batches = self.bank.sample_batches(cfg.batch_size, steps)
            sample = lambda n: spec.method.kd_view(from_uint8(next(batches)).to(self.device),  # noqa: E731
                                                   spec.image_spec)
        losses = self.trainer.kd_steps(sample, steps)
        return {"losses": losses, "seconds": time.perf_counter() - tick}

    def joint_step(self, images: np.ndarray) -> dict:
        """The student's half of a joint step (the core Trainer's `joint_step`)."""
        tick = time.perf_counter()
        losses, grad = self.trainer.joint_step(_tensor(images))
        return {"losses": losses, "grad": grad.cpu().numpy(), "seconds": time.perf_counter() - tick}

    def end_epoch(self) -> float:
        return self.trainer.end_epoch()

    def student_state(self) -> dict:
        return _to_numpy(self.trainer.student.state_dict())

    def state(self) -> dict:
        return {"trainer": self.trainer.state_dict(), "rng": _rng_state()}

    def load_state(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["rng"])

    def write_files(self, cell_dir: str, spec: CellSpec, history, grid) -> None:
        write_cell_files(Path(cell_dir), spec, history, self.trainer.student, grid)
