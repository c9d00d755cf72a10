"""Ray actors of a bench: a synthesizer pushes into a store, trainers pull from it.

    SynthesizerWorker  one per synthesis stream: the teacher, the method's synthesizer
                       and replicas of the students it plays against (adversarial terms).
                       Inversion methods keep their batches in the instance bank (the
                       store); generator methods push each round's fresh KD images into
                       a per-stream store sized to one round.
    TrainerWorker      one per student: the loop's `Trainer` (same KD code as the
                       single-process `distill`), fed by `store.sample`.

Both build everything from plain arguments (names, a checkpoint path, config overrides),
so nothing but numpy arrays and small dicts crosses process boundaries. Both call
`torch.set_num_threads` because Ray reuses worker processes.
"""
from __future__ import annotations

import time

import numpy as np
import ray
import torch

from benchmarks.datasets import get_dataset_spec, load_split
from methods import create_synthesizer, place, from_uint8, get_method, make_config, to_uint8
from methods.inversion import augment_pool_batch
from models import create_model
from orchestrator.cell import image_spec, validation_split
from orchestrator.checkpoints import load_classifier, save_classifier
from orchestrator.loop import Trainer
from orchestrator.store import StoreBank


def _to_numpy(state: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _from_numpy(state: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}


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


@ray.remote
class SynthesizerWorker:
    def __init__(self, dataset: str, method: str, budget: str, overrides: dict, teacher_ckpt: str,
                 students: list[str], seed: int, store, stream, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = device
        spec = image_spec(dataset)
        self.config = make_config(method, budget, overrides)
        teacher, _ = load_classifier(teacher_ckpt, dataset=dataset, device=device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.replicas = [place(create_model(a, spec.num_classes, in_channels=spec.channels,
                                            image_size=spec.image_size), device) for a in students]
        self.kind = get_method(method).kind
        bank = StoreBank(store) if self.kind == "inversion" else None
        self.synth = create_synthesizer(method, teacher, StudentEnsemble(self.replicas), self.config, spec,
                                        bank=bank, device=device)
        self.stream = stream

    def round(self, student_states: list[dict] | None) -> dict:
        """One synthesis round; generator methods then push the round's KD images."""
        if student_states:
            for replica, state in zip(self.replicas, student_states):
                replica.load_state_dict(_from_numpy(state))
        tick = time.perf_counter()
        result = self.synth.synthesize()
        synthesized = time.perf_counter()
        if self.kind == "generator":
            # The images the KD steps of this round train on: fresh from the generator, as
            # many as the round's KD steps consume; each trainer uses each batch once.
            # Drawn one KD batch at a time, as `distill` draws them: one 640-image draw
            # allocates (and page-faults) hundreds of MB of activations per round on a CPU, which
            # made a bench round measurably slower than the same round in one process.
            cfg = self.config
            images = np.concatenate([to_uint8(self.synth.sample(cfg.batch_size)).cpu().numpy()
                                     for _ in range(cfg.kd_steps)])
            # Waited for, so the trainers' next `sample` sees this round's images.
            ray.get(self.stream.add.remote(images, None, None))
        done = time.perf_counter()
        # Drawing KD images is KD-side work in `distill` (the trainer calls `sample`), so it
        # is reported apart and the driver books it as KD time: the two splits compare.
        return {"losses": result.losses, "images_synthesized": self.synth.images_synthesized,
                "seconds": synthesized - tick, "kd_sample_seconds": done - synthesized}

    def grid_images(self, count: int = 64) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(self.synth.sample(count).cpu()).numpy()

    def uses_student(self) -> bool:
        return bool(self.synth.uses_student)


@ray.remote
class TrainerWorker:
    def __init__(self, dataset: str, method: str, budget: str, overrides: dict, teacher_ckpt: str, student: str,
                 seed: int, source, device: str = "cpu", threads: int = 1, eval_split: str = "test",
                 data_root: str | None = None):
        torch.set_num_threads(threads)
        spec = get_dataset_spec(dataset)
        config = make_config(method, budget, overrides)
        teacher, _ = load_classifier(teacher_ckpt, dataset=dataset, device=device)
        torch.manual_seed(seed)  # right before the student, as in `run_cell`: the same initialisation
        model = create_model(student, spec.num_classes, in_channels=spec.channels, image_size=spec.image_size)
        if eval_split == "val":
            eval_set = validation_split(load_split(dataset, "train", data_root))
        else:
            eval_set = load_split(dataset, "test", data_root)
        self.trainer = Trainer(teacher, model, config, eval_set, device)
        self.image_spec = image_spec(dataset)
        self.source, self.device = source, device
        # Inversion pools are read through the dataset's train transforms (crop + flip),
        # exactly as the synthesizer's own `sample` does in a single process.
        self.augment = get_method(method).kind == "inversion"
        self.meta = {"dataset": dataset, "arch": student, "num_classes": spec.num_classes,
                     "channels": spec.channels, "image_size": spec.image_size, "mean": list(spec.mean),
                     "std": list(spec.std), "method": method}

    def _sample(self, batch_size: int) -> torch.Tensor:
        images = from_uint8(torch.from_numpy(ray.get(self.source.sample.remote(batch_size)))).to(self.device)
        return augment_pool_batch(images, self.image_spec) if self.augment else images

    def kd_round(self) -> dict:
        tick = time.perf_counter()
        sample = self._sample
        if not self.augment:
            # A generator stream holds exactly this round's fresh images: take them all once
            # (distinct, shuffled) and use each batch once, as fresh generator samples are.
            cfg = self.trainer.config
            fresh = from_uint8(torch.from_numpy(ray.get(self.source.sample.remote(cfg.kd_steps * cfg.batch_size))))
            batches = iter(fresh.split(cfg.batch_size))
            sample = lambda n: next(batches).to(self.device)  # noqa: E731
        losses = self.trainer.kd_steps(sample)
        return {"losses": losses, "seconds": time.perf_counter() - tick}

    def end_epoch(self) -> float:
        return self.trainer.end_epoch()

    def student_state(self) -> dict:
        return _to_numpy(self.trainer.student.state_dict())

    def save_student(self, path: str, accuracy: float) -> str:
        save_classifier(path, self.trainer.student, {**self.meta, "accuracy": accuracy})
        return path
