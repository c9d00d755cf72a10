"""Benchmark DFKD methods side by side on Ray, record them in MLflow, print the tables.

    python -m orchestrator.bench                  # the embedded default: fashion-mnist,
                                                  # dafl,deepinv,cmi, wrn16_2->wrn16_1, cpu budget
    python -m orchestrator.bench --methods dafl,deepinv,cmi --datasets cifar10,cifar100,tiny --budget paper
    python -m orchestrator.bench --address auto --tracking-uri http://127.0.0.1:5000 --out /shared/runs
    python -m orchestrator.bench --resume         # skip cells that already finished
    python -m orchestrator.bench --resume --dry-run   # list what would run and what would be reused

Everything a user can get wrong is checked before Ray starts. Outputs in --out:
results.csv (long: one row per cell and metric), table_<dataset>.md/.tex, accuracy_<dataset>.png,
cells/<cell>/{history.json,config.json,grid.png,student.pt}, and the MLflow store (mlflow.db).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from benchmarks.datasets import get_dataset_spec, list_datasets, load_split
from benchmarks.reference import BASELINE_ROWS, row_name
from benchmarks.suites import suite
from methods import get_method, list_methods, make_config
from orchestrator.cell import BUDGETS, CellKey, check_cell
from orchestrator.cli import ArgumentParser, UsageError, run_cli
from orchestrator.distill import parse_sets
from orchestrator.report import long_rows, plot_curves, write_tables
from orchestrator.teachers import DEFAULT_DIR as DEFAULT_TEACHER_DIR
from orchestrator.teachers import checkpoint_path
from orchestrator.tracking import Tracker, cell_key, check_tracking_uri, flatten_params, resolve_tracking_uri

MODES = ("paper", "shared")
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
    p.add_argument("--resume", action="store_true", help="skip cells that already have a finished run")
    p.add_argument("--dry-run", action="store_true", help="print the cells that would run (and, with --resume, "
                   "those reused) and stop")
    p.add_argument("--baselines", action="store_true", help="add the T. Scratch and S. Scratch rows")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-root", help="folder holding the datasets (see README, Data)")
    p.add_argument("--download", action="store_true", help="download missing datasets")
    p.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER_DIR), help="teacher checkpoint cache")
    return p


# ----------------------------------------------------------------------- validation
def split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def parse_pairs(text: str | None, dataset: str) -> list[tuple[str, str]]:
    if not text:
        return suite(dataset)
    pairs = []
    for item in split_list(text, "pairs"):
        if item.count(":") != 1 or not all(item.split(":")):
            raise UsageError(f"--pairs {item!r}: expected teacher:student, e.g. wrn40_2:wrn16_1")
        pairs.append(tuple(item.split(":")))
    return pairs


def method_overrides(methods: list[str], sets: dict[str, str], presets: list[str] | None) -> dict[str, dict]:
    """Per-method overrides from presets and --set (METHOD.KEY beats KEY beats preset)."""
    per_method: dict[str, dict] = {m: {} for m in methods}
    for path in presets or []:
        try:
            preset = json.loads(Path(path).read_text())
            method, config = preset["method"], dict(preset["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--preset {path}: not a preset file written by orchestrator.tune ({exc})") from None
        get_method(method)
        if method not in per_method:
            raise UsageError(f"--preset {path} is for method {method!r}, which is not in --methods")
        per_method[method].update(config)
    used = set()
    for key, value in sets.items():
        target, _, field = key.rpartition(".")
        targets = [target] if target else methods
        if target and target not in per_method:
            raise UsageError(f"--set {key}: method {target!r} is not in --methods ({', '.join(methods)})")
        for m in targets:
            if field in {f.name for f in dataclasses.fields(get_method(m).Config)}:
                per_method[m][field] = value
                used.add(key)
        if key not in used:
            raise UsageError(f"--set {key}: no method in --methods has a field {field!r}")
    return per_method


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: not writable ({exc.strerror or exc})") from None


def check_address(address: str | None) -> None:
    if not address:
        return
    given = address
    if address == "auto":
        # The cluster ray.init("auto") would join (RAY_ADDRESS, else the last `ray start` on
        # this machine): checked here, since ray.init retries a dead one for minutes.
        from ray._private.services import get_ray_address_from_environment
        try:
            address = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise UsageError("--address auto: no Ray cluster runs on this machine; start one with "
                             "`ray start --head --node-ip-address 127.0.0.1` or drop --address") from None
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not port.isdigit():
        host, port = address.replace("ray://", "").rsplit(":", 1) if ":" in address else (address, "6379")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        where = address if given == address else f"{given} ({address})"
        raise UsageError(f"--address {where}: no Ray cluster answers there ({exc}); "
                         f"start one with `ray start --head --node-ip-address 127.0.0.1` or drop --address") from None


def config_hash(method: str, budget: str, overrides: dict) -> str:
    """Identifies a cell's effective config: --resume reuses a finished cell only if it
    ran with the same one (the cell key alone does not say which --set was used)."""
    import hashlib

    config = dataclasses.asdict(make_config(method, budget, overrides))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def same_config(done: dict, method: str, budget: str, overrides: dict) -> bool:
    """Whether a finished run ran with the cell's effective config. Runs carry the config
    hash as a tag; runs logged before that tag existed are compared by their logged params
    (the full config, flattened the same way), so they too are reused when they match."""
    wanted = config_hash(method, budget, overrides)
    if "cell.config_hash" in done["tags"]:
        return done["tags"]["cell.config_hash"] == wanted
    config = flatten_params(dataclasses.asdict(make_config(method, budget, overrides)))
    return bool(config) and all(done["params"].get(k) == v for k, v in config.items())


def plan(args) -> dict:
    """Turns arguments into a checked plan; raises UsageError before anything starts."""
    methods = split_list(args.methods, "methods")
    for m in methods:
        get_method(m)
    datasets = split_list(args.datasets, "datasets")
    for d in datasets:
        get_dataset_spec(d)
    if args.budget not in BUDGETS:
        raise UsageError(f"unknown budget '{args.budget}'; use one of {', '.join(BUDGETS)}")
    if args.mode not in MODES:
        raise UsageError(f"unknown mode '{args.mode}'; use paper or shared")
    try:
        seeds = [int(s) for s in split_list(args.seeds, "seeds")]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if args.publish_every < 1:
        raise UsageError("--publish-every must be >= 1")
    overrides = method_overrides(methods, parse_sets(args.set), args.preset)
    pairs = {d: parse_pairs(args.pairs, d) for d in datasets}
    for d in datasets:
        for teacher, student in pairs[d]:
            for m in methods:
                check_cell(CellKey(d, teacher, student, m, seeds[0], args.budget, args.mode), overrides[m])
    if args.gpus_per_cell is not None and args.gpus_per_cell < 0:
        raise UsageError("--gpus-per-cell must be >= 0")
    # Data must be there (or downloadable) before Ray starts; actors get absolute folders.
    data_dirs = {}
    for d in datasets:
        data_dirs[d] = str(load_split(d, "test", args.data_root, args.download).source.resolve())
        archs = {a for pair in pairs[d] for a in (pair if args.baselines else pair[:1])}
        if any(not checkpoint_path(Path(args.teacher_dir), d, a).exists() for a in archs):
            load_split(d, "train", data_dirs[d])  # a classifier will train on it: fail now, not in Ray
    out = Path(args.out).resolve()
    check_writable(out)
    uri = resolve_tracking_uri(args.tracking_uri, out)
    check_tracking_uri(uri)
    check_address(args.address)
    return {"methods": methods, "datasets": datasets, "seeds": seeds, "pairs": pairs, "overrides": overrides,
            "out": out, "uri": uri, "data_dirs": data_dirs}


# ------------------------------------------------------------------------------ run
def start_ray(address: str | None):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local": always a Ray of our own; a bare ray.init() would join (and fail on
            # num_cpus with) any cluster another user started on this machine with `ray start`.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # ConnectionError, a timed-out raylet, ...: one message, no traceback
        raise UsageError(f"cannot start or join Ray at {address or 'local'}: "
                         f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    return ray


def cached_classifiers(needed: list[tuple[str, str]], teacher_dir: str, log) -> dict:
    """Accuracy (and training time) of each needed classifier whose checkpoint exists,
    loaded and checked against its dataset here in the driver: no Ray worker has to start
    (and import torch) just to read a cached teacher. The cache is a path every node sees."""
    from orchestrator.checkpoints import load_classifier

    metas = {}
    for dataset, arch in needed:
        path = checkpoint_path(Path(teacher_dir).resolve(), dataset, arch)
        if path.exists():
            spec = get_dataset_spec(dataset)
            _, meta = load_classifier(path, dataset=dataset, num_classes=spec.num_classes, channels=spec.channels)
            metas[(dataset, arch)] = {k: meta[k] for k in ("accuracy", "train_seconds") if k in meta}
            log(f"{arch} on {dataset}: {meta['accuracy']:.2f}% test accuracy ({path})")
    return metas


def train_classifiers(ray, missing: list[tuple[str, str]], args, data_dirs: dict, device: str, log) -> dict:
    """Trains missing teachers (and scratch students) in Ray tasks, one at a time, before
    any cell starts, so no two cells race to train the same teacher."""
    from orchestrator.teachers import get_classifier

    teacher_dir = Path(args.teacher_dir).resolve()

    @ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)
    def train(dataset, arch, data_root, threads):
        import torch
        torch.set_num_threads(threads)
        _, meta = get_classifier(dataset, arch, out=teacher_dir, device=device, data_root=data_root,
                                 progress=False, log=lambda *_: None)
        return {k: meta[k] for k in ("accuracy", "train_seconds") if k in meta}

    metas = {}
    for dataset, arch in missing:
        path = checkpoint_path(teacher_dir, dataset, arch)
        log(f"training {arch} on {dataset} (missing from {teacher_dir}) ...")
        try:
            metas[(dataset, arch)] = ray.get(train.remote(dataset, arch, data_dirs[dataset], os.cpu_count() or 1))
        except ray.exceptions.RayTaskError as exc:  # bad data, a crash: the cause, in one line
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise UsageError(f"preparing {arch} on {dataset} failed: "
                             f"{(str(cause).strip().splitlines() or [type(cause).__name__])[0]}") from None
        log(f"{arch} on {dataset}: {metas[(dataset, arch)]['accuracy']:.2f}% test accuracy ({path})")
    return metas


def plan_resources(ray, args, p: dict) -> tuple:
    """(Resources per actor, cells at a time, device) on the cluster Ray reports; raises
    UsageError (after stopping Ray) when a cell cannot fit."""
    from orchestrator.runner import Resources

    # Devices are the cluster's, not the driver's: a CPU-only head may drive GPU workers.
    cluster = ray.cluster_resources()
    cluster_gpus = cluster.get("GPU", 0)
    if args.device == "cpu":
        gpus = 0.0
    else:
        gpus = args.gpus_per_cell if args.gpus_per_cell is not None else (1.0 if cluster_gpus else 0.0)
    if args.device == "cuda" and not gpus:
        gpus = 1.0
    device = "cuda" if gpus > 0 else "cpu"
    n_max = max(((sum(1 for t, _ in p["pairs"][d] if t == teacher) if args.mode == "shared" else 1)
                 for d in p["datasets"] for teacher, _ in p["pairs"][d]), default=1)
    cpus = int(cluster.get("CPU", 1))
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cpus)
    per_actor = args.cpus_per_actor or min(1.0, largest_node / (1 + n_max))
    problems = []
    if per_actor * (1 + n_max) > largest_node:
        problems.append(f"a cell needs {per_actor * (1 + n_max):g} CPUs on one node "
                        f"(--cpus-per-actor {per_actor:g} x {1 + n_max} actors), the largest node has {largest_node:g}")
    if gpus > cluster_gpus:
        problems.append(f"--gpus-per-cell {gpus:g} but the cluster has {cluster_gpus:g} GPUs")
    if problems:
        ray.shutdown()
        raise UsageError("; ".join(problems))
    resources = Resources(per_actor, gpus, node_cpus=int(largest_node))
    concurrent = max(1, int(cpus // (per_actor * (1 + n_max))))
    if gpus:
        concurrent = min(concurrent, max(1, int(cluster_gpus // gpus)))
    return resources, concurrent, device


def split_cells(args, p: dict, finished: dict) -> tuple[list, list[CellKey]]:
    """Streams still to run and cells reused from `finished` (under the same config).
    Streams: paper mode, one per cell; shared mode, one per (dataset, teacher, method, seed)."""
    from orchestrator.runner import Stream

    streams, reused = [], []
    for d in p["datasets"]:
        for m in p["methods"]:
            for seed in p["seeds"]:
                by_teacher: dict[str, list[str]] = {}
                for teacher, student in p["pairs"][d]:
                    key = CellKey(d, teacher, student, m, seed, args.budget, args.mode)
                    done = finished.get(cell_key(dataclasses.asdict(key)))
                    if done and same_config(done, m, args.budget, p["overrides"][m]):
                        reused.append(key)
                        continue
                    by_teacher.setdefault(teacher, []).append(student)
                for teacher, students in by_teacher.items():
                    groups = [students] if args.mode == "shared" else [[s] for s in students]
                    streams += [Stream(d, teacher, m, seed, args.budget, args.mode, g, p["overrides"][m])
                                for g in groups]
    return streams, reused


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {args.device}: use auto, cpu or cuda (actors get whole or fractional GPUs)")
    p = plan(args)
    out: Path = p["out"]
    log = tqdm.write
    tracker = Tracker(p["uri"], args.experiment, artifact_root=out / "mlartifacts") if args.resume else None
    finished = tracker.finished_cells() if tracker else {}
    streams, reused = split_cells(args, p, finished)
    needed = [(s.dataset, s.teacher) for s in streams]
    if args.baselines:
        needed += [(d, a) for d in p["datasets"] for pair in p["pairs"][d] for a in pair]
    needed = list(dict.fromkeys(needed))
    n_cells = sum(len(s.students) for s in streams)
    if args.dry_run:
        print(f"{n_cells} cells to run ({len(reused)} finished earlier)")
        print("\n".join([f"  run    {k.slug}" for s in streams for k in s.cells()] +
                        [f"  reuse  {k.slug}" for k in reused]))
        return 0
    metas = cached_classifiers(needed, args.teacher_dir, log)
    missing = [n for n in needed if n not in metas]
    # Nothing to run and every classifier cached (a --resume of a finished bench): the
    # tables come from MLflow and the checkpoints alone, so no Ray starts.
    ray = start_ray(args.address) if streams or missing else None
    resources, concurrent, device = plan_resources(ray, args, p) if ray else (None, 1, "cpu")
    tracker = tracker or Tracker(p["uri"], args.experiment, artifact_root=out / "mlartifacts")
    if missing:  # before the parent run opens: a teacher that cannot be trained leaves no run behind
        metas.update(train_classifiers(ray, missing, args, p["data_dirs"], device, log))
    from orchestrator.runner import StreamRunner, run_streams

    lock = threading.Lock()
    parent = tracker.start_parent(f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
                                  params={"methods": ",".join(p["methods"]), "datasets": ",".join(p["datasets"]),
                                          "seeds": args.seeds, "budget": args.budget, "mode": args.mode,
                                          "argv": " ".join(sys.argv[1:]) or "(defaults)"},
                                  tags={"kind": "bench"})
    log(f"{n_cells} cells to run ({len(reused)} finished earlier), {len(streams)} streams, "
        f"{concurrent} at a time; MLflow: {p['uri']}")
    bar = tqdm(total=n_cells, desc="cells", unit="cell", dynamic_ncols=True)

    run_ids: dict = {}

    def on_cell_start(key, config):
        with lock:
            tags = {**key.tags(), "cell.config_hash": config_hash(key.method, key.budget, p["overrides"][key.method])}
            run_ids[key] = tracker.start_child(parent, key.slug, tags=tags, params=config)
        return run_ids[key]

    def on_epoch(key, epoch, metrics):
        with lock:
            tracker.log_metrics(run_ids[key], metrics, step=epoch)
        log(f"[{key.method} {key.teacher}->{key.student} s{key.seed}] epoch {epoch}: "
            f"acc {metrics['accuracy']:.2f}%  synthesis {metrics['synthesis_seconds']:.0f}s  "
            f"KD {metrics['kd_seconds']:.0f}s")

    def on_done(outcome):
        summary = {**outcome.history.summary(), "wall_seconds": outcome.wall_seconds,
                   "teacher_accuracy": metas[(outcome.key.dataset, outcome.key.teacher)]["accuracy"]}
        status = outcome.history.status
        with lock:
            numeric = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            tracker.log_metrics(outcome.run_id, {f"final/{k}": v for k, v in numeric.items()}, step=summary["epochs"])
            for name in ("history.json", "config.json", "grid.png", "student.pt"):
                if (outcome.cell_dir / name).exists():
                    tracker.log_artifact(outcome.run_id, outcome.cell_dir / name)
            tracker.finish(outcome.run_id, "FINISHED" if status == "finished" else "FAILED",
                           tags={"status": status})
        bar.update(1)
        log(f"[{outcome.key.slug}] {status}: {summary['accuracy']:.2f}% in {outcome.wall_seconds:.0f}s")

    runners = [StreamRunner(s, str(checkpoint_path(Path(args.teacher_dir).resolve(), s.dataset, s.teacher)), out,
                            resources, device, args.publish_every, "test", p["data_dirs"][s.dataset],
                            on_cell_start=on_cell_start, on_epoch=on_epoch, log=log) for s in streams]
    started = time.perf_counter()
    outcomes = run_streams(runners, concurrent, on_done=on_done, log=log)
    bar.close()

    # --------------------------------------------------------------------- tables
    rows = []
    for o in outcomes:
        rows += long_rows(o.key, o.history.status, {
            **o.history.summary(), "wall_seconds": o.wall_seconds,
            "teacher_accuracy": metas[(o.key.dataset, o.key.teacher)]["accuracy"]})
    for key in reused:
        info = finished[cell_key(dataclasses.asdict(key))]
        metrics = {k.removeprefix("final/"): v for k, v in info["metrics"].items() if k.startswith("final/")}
        rows += long_rows(key, "finished", metrics)
    if args.baselines:
        for d in p["datasets"]:
            for teacher, student in p["pairs"][d]:
                for row, arch in zip(BASELINE_ROWS, (teacher, student)):
                    key = CellKey(d, teacher, student, row, 0, args.budget, args.mode)
                    rows += long_rows(key, "finished", {"accuracy": metas[(d, arch)]["accuracy"]}, row=row)
    long = pd.DataFrame(rows, columns=[c for c in rows[0]] if rows else None)
    order = ([*BASELINE_ROWS] if args.baselines else []) + [row_name(m) for m in list_methods()]
    paths = write_tables(long, out, order) if rows else {}
    for d in p["datasets"]:
        curves = {f"{o.key.method} {o.key.teacher}->{o.key.student} s{o.key.seed}": o.history.accuracy
                  for o in outcomes if o.key.dataset == d and o.history.accuracy}
        if curves:
            paths[f"png_{d}"] = plot_curves(curves, out / f"accuracy_{d}.png", f"{d}: accuracy per epoch")
    with lock:
        for path in paths.values():
            tracker.log_artifact(parent, path, "tables")
        if rows:
            tracker.log_table(parent, long, "results.json")
        tracker.finish(parent, "FINISHED")
    if ray:
        ray.shutdown()

    print()
    for d in p["datasets"]:
        if f"md_{d}" in paths:
            print(paths[f"md_{d}"].read_text())
    failed = [o for o in outcomes if o.history.status != "finished"]
    print(f"{len(outcomes)} cells run in {time.perf_counter() - started:.0f}s, {len(failed)} failed, "
          f"{len(reused)} reused; results in {out}")
    print(f"browse the runs: {tracker.ui_command()}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
