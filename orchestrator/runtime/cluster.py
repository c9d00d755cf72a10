"""Starting, joining and sizing a Ray cluster for a bench or a search, and training the
classifiers they need before any cell starts. Every function raises UsageError (one
message, exit 2) for what the user can fix."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from benchmarks.datasets import get_dataset_spec
from orchestrator.core.classifiers import checkpoint_path
from orchestrator.core.errors import UsageError, keep_sigterm_handler
from orchestrator.runtime.reaper import start_watcher


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


# Ray starts its workers at nice 15 so that its daemons stay responsive. On a machine whose
# cores the cells fill, every wake-up of a daemon or of the driver (nice 0) then preempts one
# of an actor's compute threads mid-region while its OpenMP partner waits at the barrier:
# bench steps ran 1.10-1.17x slower than distill's (docs/results/speed.md, session 15). A local
# Ray of ours hosts only our actors, so they run at the priority `distill` runs at. A cluster
# started with `ray start` keeps its own setting (RAY_worker_niceness=0 there does the same).
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}

_watcher = None  # orchestrator/runtime/reaper.py; referenced so its pipe stays open while we live


def start_ray(address: str | None):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Methods registered from outside methods/ (methods/registry.py) must register in every
    # worker too: the variable travels with the job (the modules must import on every node).
    plugins = os.environ.get("DFKD_METHOD_MODULES")
    options = {"runtime_env": {"env_vars": {"DFKD_METHOD_MODULES": plugins}}} if plugins else {}
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, log_to_driver=False, **options)
        else:
            # "local": always a Ray of our own; a bare ray.init() would join (and fail on
            # num_cpus with) any cluster another user started on this machine with `ray start`.
            global _watcher
            _watcher = _watcher or start_watcher()  # a Ray of our own: stopped with us, however we end
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _system_config=LOCAL_SYSTEM_CONFIG, **options)
    except Exception as exc:  # ConnectionError, a timed-out raylet, ...: one message, no traceback
        raise UsageError(f"cannot start or join Ray at {address or 'local'}: "
                         f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    keep_sigterm_handler(sigterm)
    return ray


def cached_classifiers(needed: list[tuple[str, str]], teacher_dir: str, log) -> dict:
    """Accuracy (and training time) of each needed classifier whose checkpoint exists,
    loaded and checked against its dataset here in the driver: no Ray worker has to start
    (and import torch) just to read a cached teacher. The cache is a path every node sees."""
    from orchestrator.core.checkpoints import load_classifier

    metas = {}
    for dataset, arch in needed:
        path = checkpoint_path(Path(teacher_dir).resolve(), dataset, arch)
        if path.exists():
            spec = get_dataset_spec(dataset)
            _, meta = load_classifier(path, dataset=dataset, num_classes=spec.num_classes, channels=spec.channels)
            metas[(dataset, arch)] = {k: meta[k] for k in ("accuracy", "train_seconds") if k in meta}
            log(f"{arch} on {dataset}: {meta['accuracy']:.2f}% test accuracy ({path})")
    return metas


def train_classifiers(ray, missing: list[tuple[str, str]], teacher_dir: str, data_dirs: dict, device: str,
                      log, in_driver: bool = False) -> dict:
    """Trains missing teachers (and scratch students) one at a time, before any cell
    starts, so no two cells race to train the same teacher. On a local Ray they train
    here in the driver, with a progress bar and a line per epoch; joined to a cluster,
    in Ray tasks (on a GPU node when there is one)."""
    from orchestrator.core.classifiers import get_classifier

    teacher_dir = Path(teacher_dir).resolve()
    if in_driver:
        metas = {}
        for dataset, arch in missing:
            log(f"training {arch} on {dataset} (missing from {teacher_dir}) ...")
            _, meta = get_classifier(dataset, arch, out=teacher_dir, device=device, data_root=data_dirs[dataset],
                                     log=log)
            metas[(dataset, arch)] = {k: meta[k] for k in ("accuracy", "train_seconds") if k in meta}
        return metas

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


def plan_resources(ray, device_flag: str, gpus_per_cell: float | None, cpus_per_actor: float | None,
                   n_max: int) -> tuple:
    """(Resources per actor, streams at a time, device) on the cluster Ray reports, for
    streams of at most `n_max` students; raises UsageError (after stopping Ray) when a
    stream cannot fit."""
    from orchestrator.runtime.driver import Resources

    # Devices are the cluster's, not the driver's: a CPU-only head may drive GPU workers.
    cluster = ray.cluster_resources()
    cluster_gpus = cluster.get("GPU", 0)
    if device_flag == "cpu":
        gpus = 0.0
    else:
        gpus = gpus_per_cell if gpus_per_cell is not None else (1.0 if cluster_gpus else 0.0)
    if device_flag == "cuda" and not gpus:
        gpus = 1.0
    device = "cuda" if gpus > 0 else "cpu"
    cpus = int(cluster.get("CPU", 1))
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cpus)
    per_actor = cpus_per_actor or min(1.0, largest_node / (1 + n_max))
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
