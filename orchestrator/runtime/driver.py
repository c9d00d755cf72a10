"""The bench's driver: runs synthesis streams through the core round loop on Ray.

A stream is one (dataset, teacher, method, seed) synthesis process feeding one student
(`--mode paper`: the reference loop, one synthesizer per student) or all students of that
teacher at once (`--mode shared`, this project's own mode). `RayStrategy` is where the
round loop's work runs for a stream: a store actor (the stream's bank, snapshotted into the
stream's cell folder every epoch and restored from there when Ray restarts it), a
`SynthesizerActor` and one `TrainerActor` per student. The loop is the one `distill` runs
(orchestrator/core/loop.py), so per-epoch checkpoints and `--resume` behave the same:
a stream killed half-way continues from its last finished epoch.

Streams run concurrently in driver threads as cluster resources allow. A stream's placement
group and its synthesizer and trainer actors outlive it (`ActorSlots`): the next stream of
the same shape gets them with its new cell, instead of new processes that import torch and
load the teacher again (seconds per cell on a small machine).
"""
from __future__ import annotations

import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.core.cell import CellKey, CellResult, CellSpec, write_cell_files
from orchestrator.core.errors import UsageError
from orchestrator.core.loop import History, RoundLoop, RoundOutput, Strategy, load_matching_state
from orchestrator.runtime.actors import SynthesizerActor, TrainerActor
from orchestrator.runtime.store import create_store

STORE_DIR = "store"  # the store's snapshot, inside the stream's (first) cell folder
MAX_ACTOR_FAILURES_PER_EPOCH = 1  # restarts of a stream's actors for one epoch before its cells fail


def _first_line(exc: BaseException, last: bool = False) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return (lines[-1] if last else lines[0])[:300]


@dataclass
class Stream:
    """One synthesis stream: the spec of each of its cells (same dataset, teacher, method,
    seed and config; one student each)."""

    specs: list[CellSpec]

    @property
    def keys(self) -> list[CellKey]:
        return [s.key for s in self.specs]

    @property
    def students(self) -> list[str]:
        return [k.student for k in self.keys]

    def describe(self) -> str:
        k = self.keys[0]
        return f"{k.method} {k.teacher} seed {k.seed}"


@dataclass
class Resources:
    """How one stream's actors are sized; see README, "Running on a cluster"."""

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


@dataclass
class Slot:
    """A placement group (one bundle per actor: synthesizer first, then trainers) and the
    synthesizer and trainer actors placed in it, once created."""

    bundles: list[dict]
    group: object
    synth: object = None
    trainers: list = field(default_factory=list)

    def start_actors(self, resources: Resources, n_students: int) -> None:
        """Creates the synthesizer and trainer actors in this slot's group, if it has none
        yet. Returns at once: Ray starts their processes (and imports torch there) in the
        background, and the first call to an actor waits for it."""
        if self.synth is not None:
            return
        placed = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=i)} for i in range(1 + n_students)]
        self.synth = SynthesizerActor.options(**resources.synth_options(), **placed[0]).remote()
        self.trainers = [TrainerActor.options(**resources.trainer_options(n_students), **placed[1 + j]).remote()
                         for j in range(n_students)]

    def kill_actors(self) -> None:
        for actor in [self.synth, *self.trainers]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.synth, self.trainers = None, []

    def close(self) -> None:
        self.kill_actors()
        remove_placement_group(self.group)


class ActorSlots:
    """The slots of streams that finished, kept for the next stream with the same bundles
    (`run_streams` owns one). A stream that needs another shape closes the idle slots first:
    their resources may be what its placement group waits for."""

    def __init__(self):
        self._idle: list[Slot] = []
        self._lock = threading.Lock()

    def take(self, bundles: list[dict]) -> Slot | None:
        with self._lock:
            for i, slot in enumerate(self._idle):
                if slot.bundles == bundles:
                    return self._idle.pop(i)
            others, self._idle = self._idle, []
        for slot in others:
            slot.close()
        return None

    def prestart(self, streams: list[Stream], resources: Resources, count: int) -> None:
        """Reserves the slots of the first `count` streams and starts their actors now, so
        that their processes start (2-4 s: a Python process importing torch) while the
        driver does other work, such as opening the MLflow store; the streams then `take`
        them. Returns at once."""
        for stream in streams[:count]:
            bundles = resources.bundles(len(stream.specs))
            slot = Slot(bundles, placement_group(bundles, strategy="PACK"))
            slot.start_actors(resources, len(stream.specs))
            self.give_back(slot)

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            self._idle.append(slot)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.close()


class RayStrategy(Strategy):
    """The round loop's work on Ray: one store, one synthesizer, one trainer per student,
    the last two in `slot` (created there unless the slot has them from an earlier stream)."""

    def __init__(self, stream: Stream, resources: Resources, device: str, slot: Slot, store_dir: Path):
        spec, n = stream.specs[0], len(stream.specs)
        synth_threads, trainer_threads = resources.threads(n)
        # One store per stream, sized as the method says. Seeded, so a stream's draws
        # repeat; restarted from its snapshot when it dies.
        images, features = spec.method.store_capacity(spec.config)
        self.store = create_store(capacity_images=images, capacity_features=features, seed=spec.key.seed,
                                  snapshot_dir=str(store_dir))
        slot.start_actors(resources, n)
        self.synth, self.trainers = slot.synth, slot.trainers
        try:
            (self.uses_student, self.one_stage), *_ = ray.get(
                [self.synth.setup.remote(spec, stream.students, self.store, device, synth_threads),
                 *[t.setup.remote(s, self.store, device, trainer_threads) for t, s in zip(self.trainers, stream.specs)]])
        except BaseException:
            ray.kill(self.store, no_restart=True)  # the caller never gets this strategy to end it
            raise
        self.config, self.joint_per_round = spec.config, spec.method.joint_steps(spec.config)

    def synthesize(self, publish: bool, feed_kd: bool) -> RoundOutput:
        states = ray.get([t.student_state.remote() for t in self.trainers]) if publish else None
        out = ray.get(self.synth.round.remote(states, feed_kd))
        return RoundOutput(out["losses"], out["images_synthesized"], out["seconds"], out["kd_sample_seconds"])

    def joint_steps(self, students):
        (i,) = students  # RoundLoop refuses one-stage rounds with several students
        steps, synth_seconds, kd_seconds, sums = self.joint_per_round, 0.0, 0.0, {}
        for k in range(steps):
            # Chained by reference: the images go from the synthesizer to the trainer, and the
            # trainer's answer (losses, image gradient) to the synthesizer, without the driver
            # waiting in between; an actor runs one caller's calls in the order they were sent.
            images = self.synth.begin_joint.remote()
            step = self.trainers[i].joint_step.remote(images)
            done = self.synth.end_joint.remote(step, k == steps - 1)
            student, generator = ray.get([step, done])
            synth_seconds += generator["seconds"]  # the generator's forward and backward
            kd_seconds += student["seconds"]  # the student's step, backward through both networks
            for name, value in student["losses"].items():
                sums[name] = sums.get(name, 0.0) + value
        feed_seconds = ray.get(self.synth.feed.remote(self.config.kd_steps - steps))  # the other KD steps' images
        kd = {name: value / steps for name, value in sums.items()}
        return RoundOutput(generator["losses"], generator["images_synthesized"], synth_seconds,
                           feed_seconds, joint_steps=steps, joint_kd={i: (kd, kd_seconds)})

    def kd_round(self, students, steps):
        return [(r["losses"], r["seconds"])
                for r in ray.get([self.trainers[i].kd_round.remote(steps) for i in students])]

    def end_epoch(self, students):
        return ray.get([self.trainers[i].end_epoch.remote() for i in students])

    def state_dict(self) -> dict:
        # The state file alone resumes a cell: the synthesizer's state holds its bank (read
        # from the store), and the store's sampling state is in it too. The actors are asked
        # first: if one has died, nothing is written, and the snapshot (which brings back a
        # store that dies mid-epoch) never runs ahead of the state file.
        synth, *trainers = ray.get([self.synth.state.remote(), *[t.state.remote() for t in self.trainers]])
        store_rng = ray.get(self.store.rng_state.remote())
        ray.get(self.store.snapshot.remote())
        return {"synthesizer": synth, "trainers": trainers, "store_rng": store_rng}

    def load_state_dict(self, state: dict) -> None:
        ray.get([self.synth.load_state.remote(state["synthesizer"]),
                 *[t.load_state.remote(s) for t, s in zip(self.trainers, state["trainers"])],
                 self.store.set_rng_state.remote(state["store_rng"])])


class StreamRunner:
    """Runs one stream; reports epochs and outcomes through callbacks (driver side)."""

    def __init__(self, stream: Stream, out: Path, resources: Resources, device: str, *, publish_every: int = 1,
                 resume: bool = False, on_cell_start=None, on_epoch=None, progress=None, log=print):
        self.stream, self.out, self.resources, self.device = stream, Path(out), resources, device
        self.publish_every, self.resume = publish_every, resume
        self.on_cell_start = on_cell_start or (lambda spec, restored: None)
        self.on_epoch = on_epoch or (lambda key, epoch, metrics: None)
        self.progress, self.log = progress, log
        self.strategy: RayStrategy | None = None

    def cell_dir(self, key: CellKey) -> Path:
        return self.out / "cells" / key.slug

    def run(self, stop: threading.Event | None = None, slots: ActorSlots | None = None) -> list[CellResult]:
        """Runs (or continues) the stream; never raises: a failure marks its cells failed.
        With `slots`, takes its actors from there and gives them back when every cell
        finished; otherwise (or after any failure) they end with the stream."""
        stream, specs = self.stream, self.stream.specs
        home = self.cell_dir(specs[0].key)  # the stream's state and store snapshot live here
        try:
            keep = self.resume and load_matching_state(home / "state.pt", specs[0].config, len(specs))
        except UsageError as exc:  # a damaged state: the cell starts over, and says so
            self.log(f"warning: {exc}")
            keep = False
        if not keep:
            # Starting over: no state, and no snapshot a new store would restore itself from.
            (home / "state.pt").unlink(missing_ok=True)
            shutil.rmtree(home / STORE_DIR, ignore_errors=True)
        started = time.perf_counter()
        loop, slot, run_ids, startup = None, None, {}, 0.0
        try:
            bundles = self.resources.bundles(len(specs))
            slot = (slots.take(bundles) if slots else None) or self._reserve(bundles, stop, slots)
            failures: dict[int, int] = {}  # epoch -> how often an actor died in it
            while True:
                self.strategy = RayStrategy(stream, self.resources, self.device, slot, home / STORE_DIR)
                loop = RoundLoop(self.strategy, specs[0].config, len(specs), home / "state.pt", self.publish_every)
                restored = loop.restore()
                if not run_ids:  # the first start (a restart goes on in the same MLflow runs)
                    startup = time.perf_counter() - started
                    if restored:
                        self.log(f"stream {stream.describe()}: continuing after epoch {restored}")
                    for i, spec in enumerate(specs):
                        run_ids[spec.key] = self.on_cell_start(spec, loop.histories[i])
                try:
                    loop.run(on_epoch=lambda i, epoch, m: self.on_epoch(specs[i].key, epoch, m),
                             progress=self.progress, stop=stop)
                    break
                except ray.exceptions.RayActorError as exc:
                    # An actor died (killed, out of memory, its node lost): new actors continue
                    # from the last epoch's checkpoint; the same epoch failing again ends the cell.
                    epoch = min(h.epochs_done for h in loop.histories) + 1
                    failures[epoch] = failures.get(epoch, 0) + 1
                    if failures[epoch] > MAX_ACTOR_FAILURES_PER_EPOCH:
                        raise
                    self.log(f"stream {stream.describe()}: an actor died in epoch {epoch} "
                             f"({_first_line(exc)}); restarting from the last checkpoint")
                    self._kill_store()
                    slot.kill_actors()
        except Exception as exc:  # an actor died, out of memory, MLflow unreachable, interrupted ...
            message = _first_line(exc, last=True)
            if isinstance(exc, InterruptedError):
                self.log(f"stream {stream.describe()} interrupted; --resume continues it after its last epoch")
            else:
                self.log(f"stream {stream.describe()} failed: {message}")
                self.log("".join(traceback.format_exception(exc))[-2000:])
            for h in (loop.histories if loop else []):
                if h.status == "running":  # Ctrl-C is no failure: the cell continues with --resume
                    h.status = "interrupted" if isinstance(exc, InterruptedError) else \
                        f"failed: {type(exc).__name__}: {message}"
        histories = loop.histories if loop else []
        results = [self._record(spec, i, histories, time.perf_counter() - started, run_ids.get(spec.key), startup)
                   for i, spec in enumerate(specs)]
        self._kill_store()
        if slot is not None:
            if slots is not None and histories and all(h.status == "finished" for h in histories):
                slots.give_back(slot)  # healthy actors, idle: the next stream's
            else:
                slot.close()
        return results

    def _kill_store(self) -> None:
        if self.strategy is not None:
            ray.kill(self.strategy.store, no_restart=True)

    def _record(self, spec: CellSpec, i: int, histories: list, wall: float, run_id, startup: float) -> CellResult:
        history = histories[i] if histories else History(status="failed: the stream did not start")
        cell_dir = self.cell_dir(spec.key)
        try:
            if history.status == "finished":
                grid = ray.get(self.strategy.synth.grid.remote(64))
                ray.get(self.strategy.trainers[i].write_files.remote(str(cell_dir), spec, history, grid))
            else:
                write_cell_files(cell_dir, spec, history)
        except Exception as exc:  # the numbers are in; a missing artefact is not fatal
            self.log(f"could not save the files of {spec.key.slug}: {exc}")
        return CellResult(spec.key, history, spec.config_dict(), cell_dir, wall, run_id=run_id,
                          startup_seconds=startup)

    def _reserve(self, bundles: list[dict], stop: threading.Event | None, slots: ActorSlots | None) -> Slot:
        """Reserves all of a stream's actors at once (a placement group): actors created
        one by one could leave two streams each holding a synthesizer and waiting forever
        for trainer slots on a fragmented cluster. Waits (and says so) while the cluster is
        busy; takes a slot another stream gives back meanwhile (a kept slot holds its
        resources, so a stream waiting only for a new group would wait forever); a stop
        request ends the wait."""
        group = placement_group(bundles, strategy="PACK")
        waited = 0
        while not ray.wait([group.ready()], timeout=1.0)[0]:
            waited += 1
            kept = slots.take(bundles) if slots is not None else None
            if kept is not None:
                remove_placement_group(group)
                return kept
            if stop is not None and stop.is_set():
                remove_placement_group(group)
                raise InterruptedError("bench interrupted")
            if waited % 60 == 0:
                self.log(f"stream {self.stream.describe()}: waiting {waited}s for resources {bundles}")
        return Slot(bundles, group)


def run_streams(runners: list[StreamRunner], max_concurrent: int, on_done=None, log=print,
                slots: ActorSlots | None = None) -> list[CellResult]:
    """Runs streams in driver threads, at most `max_concurrent` at a time. Ctrl-C stops
    the streams in flight at their next round and cancels the queued ones. `slots`: kept
    (or prestarted) actors to use; closed at the end either way."""
    results: list[CellResult] = []
    lock = threading.Lock()
    stop = threading.Event()
    slots = slots if slots is not None else ActorSlots()

    def one(runner: StreamRunner):
        if stop.is_set():
            return []
        result = runner.run(stop, slots)
        with lock:
            results.extend(result)
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
    finally:
        slots.close()
    pool.shutdown()
    return results
