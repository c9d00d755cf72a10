"""Benchmark DFKD methods side by side on Ray, record them in MLflow, print the tables.

    python -m orchestrator.bench                  # the embedded default: fashion-mnist,
                                                  # dafl,deepinv,cmi, wrn16_2->wrn16_1, cpu budget
    python -m orchestrator.bench --methods dafl,deepinv,cmi --datasets cifar10,cifar100,tiny --budget paper
    python -m orchestrator.bench --address auto --tracking-uri http://127.0.0.1:5000 --out /shared/runs
    python -m orchestrator.bench --resume         # reuse finished cells, continue half-done ones
    python -m orchestrator.bench --resume --dry-run   # list what would run and what would be reused

Everything a user can get wrong is checked before Ray starts. Outputs in --out:
results.csv (long: one row per cell and metric), table_<dataset>.md/.tex, accuracy_<dataset>.png,
cells/<cell>/{history.json,config.json,grid.png,student.pt,state.pt,store/}, and the MLflow
store (mlflow.db).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from benchmarks.datasets import get_dataset_spec, list_datasets, load_split
from methods import BUDGETS, get_method, list_methods
from methods.config import identity
from orchestrator.cli import (ArgumentParser, OutLock, UsageError, add_guide_arg, check_writable, method_overrides,
                              parse_pairs, parse_sets, run_cli, split_list)
from orchestrator.core.cell import CellKey, CellResult, CellSpec, check_cell
from orchestrator.core.classifiers import DEFAULT_DIR as DEFAULT_TEACHER_DIR
from orchestrator.core.classifiers import checkpoint_path, find_checkpoint, sha256
from orchestrator.core.loop import check_one_stage_students
from orchestrator.core.provenance import cell_provenance
from orchestrator.report import bench_tables
from orchestrator.tracking import Tracker, cell_key, check_tracking_uri, flatten_params, resolve_tracking_uri

MODES = ("paper", "shared")
VERIFIED_FILES = ("history.json", "student.pt")  # hashed at finish; a reused cell must still match
DEFAULT_METHODS = "dafl,deepinv,cmi"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m orchestrator.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(list_methods())}")
    p.add_argument("--datasets", default="fashion-mnist", help=f"comma list of {', '.join(list_datasets())}")
    p.add_argument("--pairs", help="teacher:student,... (default: each dataset's suite, see README)")
    p.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    p.add_argument("--budget", default="cpu", help=f"one of {', '.join(BUDGETS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field for every method that has it; METHOD.KEY=VALUE for one")
    p.add_argument("--preset", action="append", metavar="FILE", help="a preset file written by orchestrator.tune")
    p.add_argument("--mode", default="paper", help="paper (one synthesizer per student) or shared")
    p.add_argument("--publish-every", type=int, default=1,
                   help="shared mode: rounds between publishing student weights to the synthesizer")
    p.add_argument("--address", help="Ray cluster to join (auto or host:port); default: a local Ray")
    p.add_argument("--gpus-per-cell", type=float, default=None, help="GPUs per cell (fractional ok); default 1 if CUDA")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs each actor reserves (default: fit the node)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under --out)")
    p.add_argument("--experiment", default="dfkd-bench", help="MLflow experiment name")
    p.add_argument("--out", default="runs/bench", help="results folder (shared path on a cluster)")
    p.add_argument("--resume", action="store_true", help="reuse finished cells and continue half-done ones")
    p.add_argument("--dry-run", action="store_true", help="print the cells that would run (and, with --resume, "
                   "those reused) and stop")
    p.add_argument("--baselines", action="store_true", help="add the T. Scratch and S. Scratch rows")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-root", help="folder holding the datasets (see README, Data)")
    p.add_argument("--download", action="store_true", help="download missing datasets")
    p.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER_DIR), help="teacher checkpoint cache")
    add_guide_arg(p)
    return p


# ----------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The checked bench: every cell's spec, built once, and where results go."""

    specs: list[CellSpec]
    datasets: list[str]
    pairs: dict[str, list[tuple[str, str]]]
    out: Path
    uri: str
    data_dirs: dict[str, str]
    teacher_dir: Path

    def needed_classifiers(self, specs: list[CellSpec], baselines: bool) -> list[tuple[str, str]]:
        needed = [(s.key.dataset, s.key.teacher) for s in specs]
        if baselines:
            needed += [(d, a) for d in self.datasets for pair in self.pairs[d] for a in pair]
        return list(dict.fromkeys(needed))


def make_plan(args) -> Plan:
    """Turns arguments into a checked plan; raises UsageError before anything starts."""
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {args.device}: use auto, cpu or cuda (actors get whole or fractional GPUs)")
    methods = [get_method(m).name for m in split_list(args.methods, "methods")]
    datasets = [get_dataset_spec(d).name for d in split_list(args.datasets, "datasets")]
    if args.budget not in BUDGETS:
        raise UsageError(f"unknown budget '{args.budget}'; use one of {', '.join(BUDGETS)}")
    if args.mode not in MODES:
        raise UsageError(f"unknown mode '{args.mode}'; use paper or shared")
    try:
        seeds = [int(s) for s in split_list(args.seeds, "seeds")]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if min(seeds) < 0:
        raise UsageError(f"--seeds {args.seeds!r}: seeds must be >= 0")
    if args.publish_every < 1:
        raise UsageError("--publish-every must be >= 1")
    if args.gpus_per_cell is not None and args.gpus_per_cell < 0:
        raise UsageError("--gpus-per-cell must be >= 0")
    overrides = method_overrides(methods, parse_sets(args.set), args.preset)
    pairs = {d: parse_pairs(args.pairs, d) for d in datasets}
    teacher_dir = Path(args.teacher_dir).resolve()
    data_dirs = {}  # data must be there (or downloadable) before Ray starts; actors get absolute folders
    for d in datasets:
        data_dirs[d] = str(load_split(d, "test", args.data_root, args.download).source.resolve())
        archs = {a for pair in pairs[d] for a in (pair if args.baselines else pair[:1])}
        if any(find_checkpoint(teacher_dir, d, a, log=tqdm.write) is None for a in sorted(archs)):
            load_split(d, "train", data_dirs[d])  # a classifier will train on it: fail now, not in Ray
    for d in datasets:  # every split a cell reads comes from this one folder, never mixed
        tqdm.write(f"data: {d} from {data_dirs[d]}")
    # A guide set is loaded (and a bad one refused) here, before anything is written.
    specs = [CellSpec.build(CellKey(d, t, s, m, seed, args.budget, args.mode, args.guide or ""), overrides[m],
                            checkpoint_path(teacher_dir, d, t), data_dirs[d])
             for d in datasets for m in methods for seed in seeds for t, s in pairs[d]]
    for spec in specs if args.mode == "shared" else []:  # a shared stream: every student of one teacher
        k = spec.key
        check_one_stage_students(spec.method.joint_steps(spec.config) > 0,
                                 sum(t == k.teacher for t, _ in pairs[k.dataset]))
    from orchestrator.runtime.cluster import check_address
    check_address(args.address)
    out = Path(args.out).resolve()
    uri = resolve_tracking_uri(args.tracking_uri, out)
    with removed_if_refused(out):  # a refused run leaves no empty --out behind
        check_writable(out)
        check_tracking_uri(uri)
    return Plan(specs, datasets, pairs, out, uri, data_dirs, teacher_dir)


@contextlib.contextmanager
def removed_if_refused(out: Path):
    """Removes `out` again if it did not exist before and a check inside refuses the run."""
    existed = out.exists()
    try:
        yield
    except Exception:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def config_hash(config) -> str:
    """Identifies a cell's effective config: --resume reuses a finished cell only if it
    ran with the same one (the cell key alone does not say which --set was used). Late
    fields at their default (methods/config.py: `identity`) are left out, so adding a field
    does not make every finished cell run again."""
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:16]


def same_config(done: dict, config) -> bool:
    """Whether a finished run ran with the cell's effective config. Runs carry the config
    hash as a tag; runs logged before that tag existed are compared by their logged params
    (the full config, flattened the same way), so they too are reused when they match."""
    if "cell.config_hash" in done["tags"]:
        return done["tags"]["cell.config_hash"] == config_hash(config)
    params = flatten_params(identity(config))
    return bool(params) and all(done["params"].get(k) == v for k, v in params.items())


def damaged_file(cell_dir: Path, tags: dict) -> str | None:
    """Why a finished cell's files cannot be reused (missing, or not what was hashed at its
    finish), or None. Runs logged before the hashes existed are not checked."""
    for name in VERIFIED_FILES:
        want = tags.get(f"file.{name}.sha256")
        if want is None:
            continue
        path = cell_dir / name
        if not path.exists():
            return f"{path} is missing"
        if sha256(path) != want:
            return f"{path} is not the file it wrote (SHA-256 differs)"
    return None


def split_streams(plan: Plan, mode: str, finished: dict):
    """Streams still to run and the specs of cells reused from `finished` (same config).
    Paper mode: one stream per cell; shared mode: one per (dataset, teacher, method, seed)."""
    from orchestrator.runtime.driver import Stream

    groups: dict[tuple, list[CellSpec]] = {}
    reused = []
    for spec in plan.specs:
        done = finished.get(cell_key(dataclasses.asdict(spec.key)))
        if done and same_config(done, spec.config):
            problem = damaged_file(plan.out / "cells" / spec.key.slug, done["tags"])
            if problem is None:
                reused.append(spec)
                continue
            tqdm.write(f"warning: {spec.key.slug} finished earlier, but {problem}: running it again")
        k = spec.key
        group = (k.dataset, k.teacher, k.method, k.seed) if mode == "shared" else k
        groups.setdefault(group, []).append(spec)
    return [Stream(specs) for specs in groups.values()], reused


# ------------------------------------------------------------------------ recording
class BenchRecorder:
    """One MLflow parent run per bench and a child per cell (a continued cell's child gets
    its restored epochs too); every MLflow write under one lock (SQLite: one writer)."""

    def __init__(self, tracker: Tracker, argv: str, args, out: Path, log):
        self.tracker, self.log, self.lock, self.run_ids = tracker, log, threading.Lock(), {}
        self.out = str(out)  # tags every run, so a resume can close the runs a dead bench left open
        self.parent = tracker.start_parent(f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
                                           tags={"kind": "bench", "bench.out": self.out}, params={
            "methods": args.methods, "datasets": args.datasets, "seeds": args.seeds, "budget": args.budget,
            "mode": args.mode, "argv": argv or "(defaults)", **({"guide": args.guide} if args.guide else {})})
        # The bar counts steps (synthesis and KD, orchestrator/core/loop.py: steps_done) over
        # every cell to run, so it moves every few seconds and its ETA is the bench's. Steps,
        # not rounds or cells: the methods' rounds differ 13x in time, their steps 1.6x.
        # Position per stream, keyed by its first cell.
        self.bar, self.bar_done, self.bar_totals = None, {}, {}

    def open_bar(self, streams: list) -> None:
        from orchestrator.core.loop import cell_steps

        self.bar_totals = {s.specs[0].key: cell_steps(s.specs[0].config) for s in streams}
        self.bar = tqdm(total=sum(self.bar_totals.values()), desc="steps", unit="step", dynamic_ncols=True)

    def steps_at(self, key: CellKey, done: int) -> None:
        """The stream of `key` has taken `done` steps (restored epochs included)."""
        with self.lock:
            step = done - self.bar_done.get(key, 0)
            if step > 0:
                self.bar_done[key] = done
                self.bar.update(step)

    def progress_of(self, stream):
        from orchestrator.core.loop import steps_done

        key, config = stream.specs[0].key, stream.specs[0].config

        def progress(phase: str, rounds: int, total: int) -> None:
            self.steps_at(key, steps_done(config, rounds, phase))
            self.bar.set_postfix_str(f"{key.method} s{key.seed}: {phase}", refresh=False)
        return progress

    def cell_started(self, spec: CellSpec, history) -> str:
        with self.lock:
            tags = {**spec.key.tags(), "cell.config_hash": config_hash(spec.config), **cell_provenance(spec),
                    "bench.out": self.out}
            run_id = self.run_ids[spec.key] = self.tracker.start_child(
                self.parent, spec.key.slug, tags=tags, params={**spec.config_dict(), **spec.guide_params()})
            for epoch in range(history.epochs_done):
                self.tracker.log_metrics(run_id, history.epoch_metrics(epoch), step=epoch + 1)
        return run_id

    def epoch(self, key: CellKey, epoch: int, metrics: dict) -> None:
        with self.lock:
            self.tracker.log_metrics(self.run_ids[key], metrics, step=epoch)
        self.log(f"[{key.method} {key.teacher}->{key.student} s{key.seed}] epoch {epoch}: "
                 f"acc {metrics['accuracy']:.2f}%  synthesis {metrics['synthesis_seconds']:.0f}s  "
                 f"KD {metrics['kd_seconds']:.0f}s")

    def cell_done(self, result: CellResult) -> None:
        summary, status = result.summary(), result.history.status
        with self.lock:
            if result.run_id:
                numeric = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
                self.tracker.log_metrics(result.run_id, {f"final/{k}": v for k, v in numeric.items()},
                                         step=summary["epochs"])
                for name in ("history.json", "config.json", "grid.png", "student.pt"):
                    if (result.cell_dir / name).exists():
                        self.tracker.log_artifact(result.run_id, result.cell_dir / name)
                if status == "finished":  # what --resume checks before it reuses the cell
                    self.tracker.set_tags(result.run_id, {f"file.{name}.sha256": sha256(result.cell_dir / name)
                                                          for name in VERIFIED_FILES})
                self.tracker.finish(result.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"),
                                    tags={"status": status})
        if self.bar is not None and status == "finished":
            self.steps_at(result.key, self.bar_totals.get(result.key, 0))
        self.log(f"[{result.key.slug}] {status}: {summary['accuracy']:.2f}% in {result.wall_seconds:.0f}s")


def prepare_ray(plan: Plan, streams: list, args, log):
    """Starts or joins Ray when there is work for it, starts the first streams' actors,
    trains missing classifiers (before any MLflow run opens: a teacher that cannot be
    trained leaves no run behind); returns (ray or None, classifier metadata, (resources,
    streams at a time, device), prestarted actor slots or None)."""
    from orchestrator.runtime.cluster import cached_classifiers, plan_resources, start_ray, train_classifiers
    from orchestrator.runtime.driver import ActorSlots

    needed = plan.needed_classifiers([s for st in streams for s in st.specs], args.baselines)
    on_disk = all(checkpoint_path(Path(plan.teacher_dir).resolve(), *n).exists() for n in needed)
    # Nothing to run and every classifier cached (a --resume of a finished bench): the
    # tables come from MLflow and the checkpoints alone, so no Ray starts.
    if not streams and on_disk:
        return None, cached_classifiers(needed, plan.teacher_dir, log), None, None
    ray = start_ray(args.address)
    n_max = max((sum(1 for t, _ in plan.pairs[d] if t == teacher) if args.mode == "shared" else 1)
                for d in plan.datasets for teacher, _ in plan.pairs[d])
    sizing = plan_resources(ray, args.device, args.gpus_per_cell, args.cpus_per_actor, n_max)
    slots = None
    if streams and on_disk:
        # The first streams' actor processes start now (2-4 s: a Python process importing
        # torch), while this driver checks the teachers and opens the MLflow store; with a
        # teacher to train they would hold the resources its training needs on a cluster.
        slots = ActorSlots()
        slots.prestart(streams, sizing[0], sizing[1])
    metas = cached_classifiers(needed, plan.teacher_dir, log)
    missing = [n for n in needed if n not in metas]
    if missing:
        metas.update(train_classifiers(ray, missing, plan.teacher_dir, plan.data_dirs, sizing[2], log,
                                       in_driver=not args.address))
    return ray, metas, sizing, slots


def run_cells(plan: Plan, streams: list, args, recorder: BenchRecorder, metas: dict, sizing,
              slots) -> list[CellResult]:
    from orchestrator.runtime.driver import StreamRunner, run_streams

    resources, concurrent, device = sizing
    recorder.open_bar(streams)

    def done(result: CellResult) -> None:
        result.teacher_accuracy = metas[(result.key.dataset, result.key.teacher)]["accuracy"]
        recorder.cell_done(result)

    runners = [StreamRunner(s, plan.out, resources, device, publish_every=args.publish_every, resume=args.resume,
                            on_cell_start=recorder.cell_started, on_epoch=recorder.epoch, log=recorder.log,
                            progress=recorder.progress_of(s))
               for s in streams]
    results = run_streams(runners, concurrent, on_done=done, log=recorder.log, slots=slots)
    recorder.bar.close()
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan, log = make_plan(args), tqdm.write
    tracker = Tracker(plan.uri, args.experiment, artifact_root=plan.out / "mlartifacts") if args.resume else None
    finished = tracker.finished_cells() if tracker else {}
    streams, reused = split_streams(plan, args.mode, finished)
    print(f"{sum(len(s.specs) for s in streams)} cells to run ({len(reused)} finished earlier), {len(streams)} streams",
          flush=True)
    if args.dry_run:
        print("\n".join([f"  run    {s.key.slug}" for st in streams for s in st.specs] +
                        [f"  reuse  {s.key.slug}" for s in reused]))
        return 0
    with OutLock(plan.out, "bench", log):
        results, reused, tracker = run_bench(plan, args, streams, reused, finished, tracker, log)
    failed = [r for r in results if r.history.status != "finished"]
    print(f"{len(results)} cells run, {len(failed)} failed, {len(reused)} reused; results in {plan.out}\n"
          f"browse the runs: {tracker.ui_command()}")
    return 1 if failed else 0


def run_bench(plan: Plan, args, streams: list, reused: list, finished: dict, tracker, log):
    """Everything after the plan, under the output folder's lock: Ray, the cells, the
    tables, the MLflow parent run (closed on every way out)."""
    # The MLflow store opens (importing mlflow, creating a new store's tables: 5-8 s on the Zen 3
    # machine) while Ray starts, which mostly waits for its own processes. Only the store and
    # the experiment: no run opens before the classifiers are there.
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(Tracker, plan.uri, args.experiment, artifact_root=plan.out / "mlartifacts") \
            if tracker is None else None
        ray, metas, sizing, slots = prepare_ray(plan, streams, args, log)
        tracker = tracker or opening.result()
    if args.resume and (closed := tracker.close_abandoned("bench.out", str(plan.out))):
        log(f"marked {closed} run(s) KILLED that a bench which died had left RUNNING")
    recorder = BenchRecorder(tracker, " ".join(sys.argv[1:]), args, plan.out, log)
    log(f"MLflow: {plan.uri}" + (f"; {sizing[1]} streams at a time" if sizing else ""))
    started = time.perf_counter()
    try:
        results = run_cells(plan, streams, args, recorder, metas, sizing, slots) if streams else []
        paths = bench_tables(plan, results, reused, finished, metas, args.baselines)
        for path in paths.values():
            tracker.log_artifact(recorder.parent, path, "tables")
        tracker.finish(recorder.parent, "FINISHED")
    except BaseException:  # Ctrl-C, a lost tracking server: the parent run never stays RUNNING
        tracker.finish(recorder.parent, "KILLED")
        raise
    finally:
        if ray:
            ray.shutdown()
    for d in plan.datasets:
        print("\n" + paths[f"md_{d}"].read_text() if f"md_{d}" in paths else "")
    print(f"bench wall time {time.perf_counter() - started:.0f}s")
    return results, reused, tracker


if __name__ == "__main__":
    run_cli(main)
