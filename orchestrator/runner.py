"""The bench driver: runs synthesis streams on Ray and records their cells.

A stream is one (dataset, teacher, method, seed) synthesis process feeding one student
(`--mode paper`: the reference loop, one synthesizer per student) or all students of that
teacher at once (`--mode shared`, this project's own mode). Per stream the driver
creates a store actor, a SynthesizerWorker and one TrainerWorker per student, and runs
the reference loop semantics in lockstep:

    for each epoch: for each of ep_steps // kd_steps rounds:
        [publish the students' weights to the synthesizer if it plays against them]
        synthesizer.round()          -> pushes into the store
        every trainer.kd_round()     -> kd_steps updates on batches pulled from the store
    every trainer.end_epoch()        -> cosine step + evaluation

Streams run concurrently in driver threads as cluster resources allow; all MLflow
writes go through one lock (SQLite has a single writer).
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from methods import make_config
from orchestrator.cell import CellKey
from orchestrator.loop import EpochLog, History, NonFiniteLoss, rounds_per_epoch
from orchestrator.store import create_store
from orchestrator.workers import SynthesizerWorker, TrainerWorker


@dataclass
class Stream:
    dataset: str
    teacher: str
    method: str
    seed: int
    budget: str
    mode: str
    students: list[str]
    overrides: dict = field(default_factory=dict)

    def cells(self) -> list[CellKey]:
        return [CellKey(self.dataset, self.teacher, s, self.method, self.seed, self.budget, self.mode)
                for s in self.students]


@dataclass
class CellOutcome:
    key: CellKey
    history: History
    config: dict
    cell_dir: Path
    wall_seconds: float
    run_id: str | None = None


@dataclass
class Resources:
    """How one stream's actors are sized; see README, "Cluster"."""

    cpus_per_actor: float = 1.0
    gpus_per_cell: float = 0.0
    node_cpus: int = 2

    def synth_options(self) -> dict:
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_cell / 2}

    def trainer_options(self, n_students: int) -> dict:
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_cell / 2 / n_students}

    def bundles(self, n_students: int) -> list[dict]:
        """One placement-group bundle per actor of a stream: synthesizer first, then trainers."""
        def bundle(options):
            out = {"CPU": options["num_cpus"], "GPU": options["num_gpus"]}
            return {k: v for k, v in out.items() if v > 0}  # Ray refuses zero-sized entries
        return [bundle(self.synth_options())] + [bundle(self.trainer_options(n_students))] * n_students

    def threads(self, n_students: int) -> tuple[int, int]:
        # Synthesis and KD alternate, so the synthesizer may use the stream's whole CPU
        # share while trainers wait, and trainers split it while they run together.
        stream = max(int(round(self.cpus_per_actor * (1 + n_students))), 1)
        stream = min(stream, self.node_cpus)
        return stream, max(stream // n_students, 1)


class StreamRunner:
    """Runs one stream; reports epochs and outcomes through callbacks (driver side)."""

    def __init__(self, stream: Stream, teacher_ckpt: str, out: Path, resources: Resources, device: str,
                 publish_every: int = 1, eval_split: str = "test", data_root: str | None = None,
                 on_cell_start=None, on_epoch=None, log=print):
        self.stream, self.teacher_ckpt, self.out = stream, teacher_ckpt, Path(out)
        self.resources, self.device = resources, device
        self.publish_every, self.eval_split, self.data_root = max(publish_every, 1), eval_split, data_root
        self.on_cell_start = on_cell_start or (lambda key, config: None)
        self.on_epoch = on_epoch or (lambda key, epoch, metrics: None)
        self.log = log

    def run(self, stop: threading.Event | None = None) -> list[CellOutcome]:
        """Runs the stream; never raises: a failure marks the affected cells failed."""
        s, res = self.stream, self.resources
        config = make_config(s.method, s.budget, s.overrides)
        keys = s.cells()
        histories = {key: History() for key in keys}
        logs = {key: EpochLog(histories[key]) for key in keys}
        run_ids: dict = {}
        started = time.perf_counter()
        actors, trainers, synth, groups = [], [], None, []
        try:
            for key in keys:
                run_ids[key] = self.on_cell_start(key, dataclasses.asdict(config))
            n = len(s.students)
            synth_threads, trainer_threads = res.threads(n)
            group = self._reserve(res.bundles(n), stop)
            groups.append(group)
            placed = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
                      for i in range(1 + n)]
            # One store per stream, of the kind the method needs (each actor is a process
            # that imports torch: seconds of start-up on a small machine). Inversion
            # methods: the instance bank their batches accumulate in (and CMI's feature
            # bank). Generator methods: a store sized to one round of fresh KD images.
            if _kind(s.method) == "inversion":
                store, stream_store = create_store(capacity_features=getattr(config, "bank_size", 40960)), None
            else:
                store, stream_store = None, create_store(capacity_images=config.kd_steps * config.batch_size)
            source = store if store is not None else stream_store
            actors.append(source)
            synth = SynthesizerWorker.options(**res.synth_options(), **placed[0]).remote(
                s.dataset, s.method, s.budget, s.overrides, self.teacher_ckpt, s.students, s.seed, store,
                stream_store, self.device, synth_threads)
            trainers = [TrainerWorker.options(**res.trainer_options(n), **placed[1 + j]).remote(
                s.dataset, s.method, s.budget, s.overrides, self.teacher_ckpt, student, s.seed, source,
                self.device, trainer_threads, self.eval_split, self.data_root) for j, student in enumerate(s.students)]
            actors += [synth, *trainers]
            adversarial = ray.get(synth.uses_student.remote())
            rounds = rounds_per_epoch(config)
            synth_time = 0.0
            kd_time = {key: 0.0 for key in keys}
            live = list(range(n))  # students still training; a NaN in one student's KD drops only it
            for epoch in range(config.epochs):
                for r in range(rounds):
                    if stop is not None and stop.is_set():
                        raise InterruptedError("bench interrupted")
                    where = f"epoch {epoch + 1}, round {r + 1}"
                    states = None
                    if adversarial and (epoch * rounds + r) % self.publish_every == 0:
                        # Replicas of dropped students keep their last weights.
                        states = ray.get([trainers[i].student_state.remote() for i in range(n)]) if \
                            len(live) == n else None
                    out = ray.get(synth.round.remote(states))
                    synth_time += out["seconds"]
                    for i in live:  # a synthesis NaN fails every cell of the stream (raises)
                        logs[keys[i]].add(out["losses"], "synth/", f"synthesis ({where})")
                    results = ray.get([trainers[i].kd_round.remote() for i in live])
                    for i, kd in zip(list(live), results):
                        kd_time[keys[i]] += kd["seconds"] + out["kd_sample_seconds"]
                        try:
                            logs[keys[i]].add(kd["losses"], "kd/", f"KD ({where})")
                        except NonFiniteLoss as exc:
                            histories[keys[i]].status = f"failed: {exc}"
                            live.remove(i)
                    if not live:
                        break
                if not live:
                    break
                accuracies = ray.get([trainers[i].end_epoch.remote() for i in live])
                for i, acc in zip(live, accuracies):
                    key = keys[i]
                    metrics = logs[key].close_epoch(acc, out["images_synthesized"], synth_time, kd_time[key],
                                                    config.epochs)
                    self.on_epoch(key, epoch + 1, metrics)
        except NonFiniteLoss as exc:
            for h in histories.values():
                if not h.status.startswith("failed"):
                    h.status = f"failed: {exc}"
        except Exception as exc:  # an actor died, out of memory, MLflow unreachable, interrupted ...
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            self.log(f"stream {s.method} {s.teacher} seed {s.seed} failed: {message}")
            if not isinstance(exc, InterruptedError):
                self.log("".join(traceback.format_exception(exc))[-2000:])
            for h in histories.values():
                if not h.status.startswith("failed"):
                    h.status = f"failed: {type(exc).__name__}: {message}"
        wall = time.perf_counter() - started
        outcomes = []
        for i, key in enumerate(keys):
            cell_dir = self.out / "cells" / key.slug
            history = histories[key]
            try:
                cell_dir.mkdir(parents=True, exist_ok=True)
                (cell_dir / "history.json").write_text(json.dumps(dataclasses.asdict(history), indent=2))
                (cell_dir / "config.json").write_text(json.dumps({"cell": dataclasses.asdict(key),
                                                                  "config": dataclasses.asdict(config)}, indent=2))
                if history.status == "finished":
                    ray.get(trainers[i].save_student.remote(str(cell_dir / "student.pt"), history.accuracy[-1]))
                    _save_grid(ray.get(synth.grid_images.remote(64)), cell_dir / "grid.png")
            except Exception as exc:  # the numbers are in; a missing artefact is not fatal
                self.log(f"could not save artefacts of {key.slug}: {exc}")
            outcomes.append(CellOutcome(key, history, dataclasses.asdict(config), cell_dir, wall, run_ids.get(key)))
        for actor in actors:
            ray.kill(actor)
        for group in groups:
            remove_placement_group(group)
        return outcomes

    def _reserve(self, bundles: list[dict], stop: threading.Event | None):
        """Reserves all of a stream's actors at once (a placement group): actors created
        one by one could leave two streams each holding a synthesizer and waiting forever
        for trainer slots on a fragmented cluster. Waits (and says so) while the cluster is
        busy; a stop request ends the wait."""
        group = placement_group(bundles, strategy="PACK")
        waited = 0.0
        while not ray.wait([group.ready()], timeout=5.0)[0]:
            waited += 5.0
            if stop is not None and stop.is_set():
                remove_placement_group(group)
                raise InterruptedError("bench interrupted")
            if waited % 60 == 0:
                self.log(f"stream {self.stream.method} {self.stream.teacher} seed {self.stream.seed}: "
                         f"waiting {waited:.0f}s for resources {bundles}")
        return group


def _kind(method: str) -> str:
    from methods import get_method
    return get_method(method).kind


def _save_grid(images: np.ndarray, path: Path) -> None:
    from torchvision.utils import save_image

    save_image(torch.from_numpy(np.array(images)).float() / 255, path, nrow=8, padding=1)


def run_streams(runners: list[StreamRunner], max_concurrent: int, on_done=None, log=print) -> list[CellOutcome]:
    """Runs streams in driver threads, at most `max_concurrent` at a time. Ctrl-C stops
    the streams in flight at their next round and cancels the queued ones."""
    outcomes: list[CellOutcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def one(runner: StreamRunner):
        if stop.is_set():
            return []
        result = runner.run(stop)
        with lock:
            outcomes.extend(result)
            for outcome in result if on_done else []:
                try:
                    on_done(outcome)
                except Exception as exc:  # bookkeeping of one cell must not sink the bench
                    log(f"could not record {outcome.key.slug}: {exc}")
        return result

    pool = ThreadPoolExecutor(max_workers=max(max_concurrent, 1))
    try:
        for future in [pool.submit(one, r) for r in runners]:
            future.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return outcomes
