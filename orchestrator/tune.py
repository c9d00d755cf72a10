"""Tune one DFKD method's hyperparameters with Ray Tune (Optuna TPE + ASHA), tracked in MLflow.

    python -m orchestrator.tune --method cmi --dataset fashion-mnist --pair wrn16_2:wrn16_1 \
        --num-samples 32 --max-concurrent 2 --budget cpu
    python -m orchestrator.tune --method dafl --space my_space.yaml --set epochs=20 --seed 1
    python -m orchestrator.tune --method cmi --resume          # continue the last interrupted search
    python -m orchestrator.tune --method cmi --address auto --gpus-per-trial 0.5 --storage /shared/ray_results
    python -m orchestrator.bench --methods cmi --preset runs/tune/preset_cmi_fashion-mnist.json

Trials are scored on a fixed 10% validation slice of the train set, never on the test
set: Optuna proposes configs from the method's `search_space()` (or --space FILE), ASHA
stops weak trials after each epoch. A trial checkpoints its whole resume state (student,
optimisers, synthesizer and pool) every epoch, so a failed trial is retried from its
last epoch and an interrupted search continues with --resume. The best trial's final
student is evaluated once on the test set. Outputs in --out: the MLflow store
(mlflow.db), searches/<name>.json (trial -> MLflow run, status), and
preset_<method>_<dataset>.json for `orchestrator.bench --preset`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ray.tune import Callback  # importing Ray's API does not start Ray

from benchmarks.datasets import get_dataset_spec, load_split
from methods import BUDGETS, get_method, list_methods, make_config
from orchestrator.cli import (ArgumentParser, UsageError, add_data_args, add_guide_arg, check_writable, parse_pairs,
                              parse_sets, run_cli)
from orchestrator.core.cell import CellKey, CellSpec, check_cell, check_guide, run_in_process
from orchestrator.core.classifiers import checkpoint_path, find_checkpoint
from orchestrator.core.loop import epochs_done
from orchestrator.core.provenance import code_version
from orchestrator.runtime.cluster import check_address, start_ray, train_classifiers
from orchestrator.search_space import check_space, load_space, space_json, to_tune
from orchestrator.tracking import Tracker, check_tracking_uri, resolve_tracking_uri

METRICS = ("val_accuracy", "kd/loss", "synth/total")  # reported by every method, every epoch


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m orchestrator.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="cmi", help=f"one of {', '.join(list_methods())}")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--pair", help="teacher:student (default: the dataset's first suite pair)")
    p.add_argument("--budget", default="cpu", help=f"one of {', '.join(BUDGETS)}")
    p.add_argument("--num-samples", type=int, default=16, help="trials to run")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument("--space", metavar="FILE", help="search space (JSON or YAML); default: the method's own")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fix a config field in every trial")
    p.add_argument("--metric", default="val_accuracy", help=f"what to optimise: {', '.join(METRICS)}")
    p.add_argument("--mode", default="max", help="max or min")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler (and every trial's cell)")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial (from its checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (the last one, or --name)")
    p.add_argument("--name", help="search name (default: <method>_<dataset>_<pair>_<budget>_<time>)")
    p.add_argument("--address", help="Ray cluster to join (auto or host:port); default: a local Ray")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractional ok; default 1 if CUDA, else 0")
    p.add_argument("--storage", help="Ray Tune results folder (shared on a cluster; default <out>/ray_results)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under --out)")
    p.add_argument("--experiment", default="dfkd-tune", help="MLflow experiment name")
    p.add_argument("--out", default="runs/tune", help="results folder")
    add_data_args(p)
    add_guide_arg(p)
    return p


# ----------------------------------------------------------------------- validation
def grace_period(asked: int, warmup: int, warmup_space: dict | None, max_t: int) -> int:
    """ASHA's grace period, past every warm-up a trial can have: warm-up epochs only
    synthesize, so a trial scores chance until its first KD epoch, and a grace period
    inside the warm-up would stop every trial that warms up (seen in a Fast search: all
    nine trials with warm-up stopped at epoch 1 at 10.35%)."""
    if warmup_space is not None:
        warmup = int(max(warmup_space.get("values") or [warmup_space["high"]]))
    return min(max(asked, warmup + 1), max_t)


def plan(args) -> dict:
    """Checks every argument and returns the search plan; raises UsageError before Ray starts."""
    get_method(args.method)
    get_dataset_spec(args.dataset)
    if args.budget not in BUDGETS:
        raise UsageError(f"unknown budget '{args.budget}'; use one of {', '.join(BUDGETS)}")
    pairs = parse_pairs(args.pair, args.dataset)
    if args.pair and len(pairs) != 1:
        raise UsageError(f"--pair {args.pair!r}: give one teacher:student pair")
    teacher, student = pairs[0]
    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent),
                        ("--grace-period", args.grace_period)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial or 0) < 0:
        raise UsageError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.mode not in ("max", "min"):
        raise UsageError(f"--mode {args.mode!r}: use max or min")
    if args.metric not in METRICS:
        raise UsageError(f"--metric {args.metric!r}: use one of {', '.join(METRICS)}")
    fixed = parse_sets(args.set)
    key = CellKey(args.dataset, teacher, student, args.method, args.seed, args.budget, guide=args.guide or "")
    config = check_cell(key, fixed)
    # With a guide set, the method's guided fields (guide, lr_d) are searched too.
    space = check_space(args.method, load_space(args.space) if args.space else
                        get_method(args.method).search_space(guided=bool(key.guide)), args.budget, fixed)
    # ASHA's horizon: the configured epochs, or the most a searched `epochs` can reach.
    e = space.get("epochs")
    max_t = config.epochs if e is None else int(max(e.get("values") or [e["high"]]))
    grace = grace_period(args.grace_period, config.warmup_epochs, space.get("warmup_epochs"), max_t)
    # Data before Ray; trials get absolute folders (Tune runs them in other directories).
    data_root = str(load_split(args.dataset, "train", args.data_root, args.download).source.resolve())
    guided = guide_plan(key, config, data_root)  # a bad guide set is refused before anything is written
    out = Path(args.out).expanduser().resolve()
    check_writable(out)
    storage = Path(args.storage).expanduser().resolve() if args.storage else out / "ray_results"
    check_writable(storage)
    uri = resolve_tracking_uri(args.tracking_uri, out)
    check_tracking_uri(uri)
    check_address(args.address)
    slug = f"{args.method}_{args.dataset}_{teacher}-{student}_{args.budget}"
    if key.guide:
        slug += f"_guide-{key.guide.replace(':', '')}"
    name = args.name or f"{slug}_{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        name = args.name or _last_search(storage, slug)
        if not _can_restore(storage / name):
            raise UsageError(f"--resume: no search to continue at {storage / name}; run without --resume")
    elif (storage / name).exists():
        raise UsageError(f"a search named {name!r} exists in {storage}; add --resume to continue it")
    p = {"key": key, "fixed": fixed, "space": space, "max_t": max_t, "grace": grace, "num_samples": args.num_samples,
         "metric": args.metric, "mode": args.mode, "data_root": data_root, "out": out, "storage": storage,
         "uri": uri, "name": name, "record": out / "searches" / f"{name}.json", **guided}
    if args.resume and p["record"].exists():  # the search goes on as it was started
        p.update(saved_settings(args, json.loads(p["record"].read_text())["settings"], fixed))
        if p["key"].guide != key.guide:  # resumed by --name without repeating its --guide
            p.update(guide_plan(p["key"], config, data_root))
    return p


def guide_plan(key: CellKey, config, data_root: str) -> dict:
    """The search's guide set, loaded (and checked) in the driver: the absolute file of a
    condensed set for the trials (Tune runs them in other folders) and its MLflow params."""
    guide = check_guide(key, data_root)
    cache = guide.identity["source"] if guide is not None and guide.identity["kind"] == "condensed" else None
    return {"guide_cache": cache, "guide_params": CellSpec(key, config, "", data_root, guide_cache=cache).guide_params()}


def saved_settings(args, settings: dict, fixed: dict) -> dict:
    """What a resumed search runs with: every setting it was started with. A flag given
    again with another value is refused (exit 2), never silently applied or ignored."""
    typed = getattr(args, "typed", set())  # the flags on the command line (parse_args below)
    saved = dict(settings)
    if "key" in saved:
        key = CellKey(**saved["key"])
        for field in ("method", "dataset", "budget", "seed", "guide"):
            given, kept = getattr(args, field) or type(getattr(key, field))(), getattr(key, field)
            if f"--{field}" in typed and given != kept:
                raise UsageError(f"--{field} {given}: this search was started with --{field} {kept}; --resume "
                                 f"continues it as it was started (drop --{field}, or start a new search)")
        saved["key"] = key
    if fixed and fixed != saved.get("fixed"):
        raise UsageError(f"--set {fixed}: this search was started with --set {saved.get('fixed') or '(none)'}; "
                         "--resume continues it as it was started")
    return saved


def _can_restore(path: Path) -> bool:
    from ray.tune import Tuner
    return path.is_dir() and Tuner.can_restore(str(path))


def _last_search(storage: Path, slug: str) -> str:
    found = sorted(p.name for p in storage.glob(f"{slug}_*") if _can_restore(p)) if storage.is_dir() else []
    if not found:
        raise UsageError(f"--resume: no earlier search {slug}_* in {storage}; run without --resume")
    return found[-1]


# --------------------------------------------------------------------------- trials
class TrialFailed(RuntimeError):
    """The cell stopped on NaN/Inf: raised so Tune marks the trial ERRORED."""


def make_trainable(ctx: dict):
    """One trial = one cell scored on the validation slice, reporting every epoch with
    the cell's resume state as the Tune checkpoint."""

    def trial(config: dict) -> None:
        import torch
        from ray import tune

        torch.set_num_threads(ctx["threads"])  # workers are reused: set it every time
        trial_dir = Path(tune.get_context().get_trial_dir())
        key = CellKey(**ctx["key"])
        spec = CellSpec.build(key, {**ctx["fixed"], **config}, checkpoint_path(ctx["teacher_dir"], key.dataset,
                                                                               key.teacher), ctx["data_root"], "val",
                              ctx.get("guide_cache"))
        cell_dir = trial_dir / key.slug
        state = cell_dir / "state.pt"
        checkpoint = tune.get_checkpoint()
        if checkpoint:  # a retried or resumed trial: the round loop continues from this state
            state.parent.mkdir(parents=True, exist_ok=True)
            with checkpoint.as_directory() as folder:
                restore_state(Path(folder) / "state.pt", state)

        epochs = spec.config.epochs
        last: dict = {}

        def report(metrics: dict) -> None:
            folder = trial_dir / "report"  # what Tune copies into the trial's checkpoint
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:  # a hard link is enough: the loop replaces state.pt, it never rewrites it
                os.link(state, folder / "state.pt")
            except OSError:  # a file system without hard links
                shutil.copy2(state, folder / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

        def on_epoch(epoch: int, metrics: dict) -> None:
            metrics = {"val_accuracy": metrics.pop("accuracy"), "epoch": epoch, **metrics}
            if epoch < epochs:
                report(metrics)
            else:  # Tune stops a trial at max_t inside report: let the cell write its files first
                last.update(metrics)

        device = "cuda" if ctx["gpus"] and torch.cuda.is_available() else "cpu"
        result = run_in_process(spec, cell_dir, device, on_epoch=on_epoch, log=lambda *_: None)
        history = result.history
        if history.status != "finished":
            raise TrialFailed(history.status)
        if not last:  # interrupted after its last epoch's state, before reporting it: report it now
            on_epoch(history.epochs_done, history.epoch_metrics(history.epochs_done - 1))
        report(last)

    return trial


class TrialRecorder(Callback):
    """Runs on the driver, so the MLflow store has one writer: one child run per trial
    under the search's parent run, plus `record` (JSON: parent run, and per trial its run
    id, config, starts, epochs, status), which --resume and the final table read.

    Tune pickles its callbacks into the experiment (and restores them on --resume), so
    the Tracker is opened lazily and never pickled."""

    def __init__(self, record: Path, uri: str, experiment: str, artifact_root: Path, tags: dict, fixed: dict,
                 tracker: Tracker | None = None, log=print, params: dict | None = None):
        self.record, self.uri, self.experiment, self.artifact_root = Path(record), uri, experiment, artifact_root
        self.tags, self.fixed, self.log = tags, fixed, log
        self.params = dict(params or {})  # logged with every trial's run: the guide set's identity
        self._tracker = tracker

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None, "log": print}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment, artifact_root=self.artifact_root)
        return self._tracker

    def _update(self, trial_id: str, **values) -> dict:
        data = json.loads(self.record.read_text())
        entry = data["trials"].setdefault(trial_id, {})
        entry.update(values)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.record)
        return entry

    def _entry(self, trial_id: str) -> dict:
        return json.loads(self.record.read_text())["trials"].get(trial_id, {})

    def _run(self, trial) -> tuple[dict, str]:
        """The trial's record entry and MLflow child run (created at its first event)."""
        entry = self._entry(trial.trial_id)
        if "run_id" not in entry:
            parent = json.loads(self.record.read_text())["parent"]
            run_id = self.tracker.start_child(parent, f"trial {trial.trial_id}",
                                              tags={"trial_id": trial.trial_id, **self.tags},
                                              params={**self.fixed, **trial.config,
                                                      **getattr(self, "params", {})})
            entry = self._update(trial.trial_id, run_id=run_id, config=trial.config)
        return entry, entry["run_id"]

    def on_trial_start(self, iteration, trials, trial, **info):
        entry, _ = self._run(trial)
        self._update(trial.trial_id, starts=entry.get("starts", 0) + 1, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        _, run_id = self._run(trial)
        metrics = {k: v for k, v in result.items() if k == "val_accuracy" or "/" in k or k.endswith("_seconds")}
        self.tracker.log_metrics(run_id, metrics, step=result["epoch"])
        self._update(trial.trial_id, epochs=result["epoch"], val_accuracy=result["val_accuracy"])
        self.log(f"[trial {trial.trial_id}] epoch {result['epoch']}: val acc {result['val_accuracy']:.2f}%")

    def on_trial_recover(self, iteration, trials, trial, **info):
        entry, _ = self._run(trial)
        self._update(trial.trial_id, failures=entry.get("failures", 0) + 1)
        self.log(f"[trial {trial.trial_id}] failed; retrying from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        _, run_id = self._run(trial)
        self.tracker.finish(run_id, "FINISHED", tags={"status": "finished"})
        self._update(trial.trial_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        _, run_id = self._run(trial)
        why = _error_line(trial)
        self.tracker.finish(run_id, "FAILED", tags={"status": why})
        self._update(trial.trial_id, status="ERRORED", error=why)
        self.log(f"[trial {trial.trial_id}] errored: {why}")


def _error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return "error (see the trial's error.txt)"
    lines = [line for line in text.splitlines() if line.strip()]
    failed = [line for line in lines if "TrialFailed" in line]
    return (failed or lines or ["error"])[-1].strip()[:500]


# ------------------------------------------------------------------------------ run
def evaluate_best(best, key: CellKey, data_root: str) -> float:
    """Test accuracy of the best trial's final student (from its last checkpoint)."""
    import torch

    from models import create_model
    from orchestrator.core.training import evaluate

    spec = get_dataset_spec(key.dataset)
    with best.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    student = create_model(key.student, spec.num_classes, in_channels=spec.channels, image_size=spec.image_size)
    student.load_state_dict(state["strategy"]["trainers"][0]["student"])
    return evaluate(student, load_split(key.dataset, "test", data_root))


def open_search(p: dict, args, tracker: Tracker) -> str:
    """The search's MLflow parent run and its record file (kept from the first start on
    --resume); returns the parent run id."""
    key, record = p["key"], p["record"]
    if not (args.resume and record.exists()):
        parent = tracker.start_parent(p["name"], tags={"kind": "tune", **key.tags(), **code_version()}, params={
            "method": key.method, "dataset": key.dataset, "pair": f"{key.teacher}:{key.student}",
            "budget": key.budget, "num_samples": p["num_samples"], "space": space_json(p["space"]),
            "fixed": json.dumps(p["fixed"]), "metric": p["metric"], "mode": p["mode"], "seed": args.seed,
            **p.get("guide_params", {})})
        settings = {k: p[k] for k in ("fixed", "space", "max_t", "num_samples", "metric", "mode")}
        settings["key"] = dataclasses.asdict(key)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"parent": parent, "name": p["name"], "settings": settings, "trials": {}},
                                     indent=2))
    return json.loads(record.read_text())["parent"]


def make_tuner(p: dict, args, tracker: Tracker, gpus: float):
    """A new Tuner (Optuna TPE + ASHA), or the interrupted one restored with --resume."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    key = p["key"]
    ctx = {"key": dataclasses.asdict(key), "fixed": p["fixed"], "data_root": p["data_root"], "gpus": gpus,
           "guide_cache": p.get("guide_cache"),
           "teacher_dir": str(Path(args.teacher_dir).resolve()), "threads": max(int(args.cpus_per_trial), 1)}
    trainable = tune.with_resources(make_trainable(ctx), {"cpu": args.cpus_per_trial, "gpu": gpus})
    path = p["storage"] / p["name"]
    if args.resume:
        print(f"continuing the search at {path}")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    recorder = TrialRecorder(p["record"], p["uri"], args.experiment, p["out"] / "mlartifacts",
                             {**key.tags(), "search": p["name"]}, p["fixed"], tracker=tracker,
                             params=p.get("guide_params"))
    return tune.Tuner(
        trainable, param_space=to_tune(p["space"]),
        tune_config=tune.TuneConfig(
            metric=p["metric"], mode=p["mode"], num_samples=p["num_samples"],
            max_concurrent_trials=args.max_concurrent, search_alg=OptunaSearch(seed=args.seed),
            # ASHA's clock is the cell's own epoch, not Tune's report count: a trial
            # interrupted between writing its state and Tune saving the checkpoint
            # continues from the newer state in its folder, and Tune's count, taken
            # from the older checkpoint, would then run one behind.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=p["max_t"],
                                    grace_period=p.get("grace", min(args.grace_period, p["max_t"])))),
        run_config=tune.RunConfig(
            name=p["name"], storage_path=str(p["storage"]), callbacks=[recorder], verbose=0,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def parse_args(argv=None):
    """The arguments, and which flags were typed (a resumed search refuses conflicting ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    p = plan(args)
    key = p["key"]
    # Tiny trials checkpoint often; Tune's warning about frequent state snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    import torch

    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else float(torch.cuda.is_available())
    tracker = Tracker(p["uri"], args.experiment, artifact_root=p["out"] / "mlartifacts")
    parent = open_search(p, args, tracker)
    owned = not ray.is_initialized()  # a caller that started Ray itself keeps it
    if owned:
        start_ray(args.address)
    try:
        if find_checkpoint(Path(args.teacher_dir).resolve(), key.dataset, key.teacher) is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"  # trained once here, not by each trial
            train_classifiers(ray, [(key.dataset, key.teacher)], args.teacher_dir, {key.dataset: p["data_root"]},
                              device, print)
        results = make_tuner(p, args, tracker, gpus).fit()
        return report(results, p, tracker, parent)
    finally:
        if owned:
            ray.shutdown()


def restore_state(saved: Path, state: Path) -> bool:
    """Copies Tune's checkpointed cell state over the trial's own, unless the trial's own is
    as new: Ctrl-C can fall after an epoch's state and report were written but before Tune
    recorded that checkpoint, and restoring the older one would run (and report) that epoch
    twice. Returns whether it copied."""
    if epochs_done(saved) <= epochs_done(state):
        return False
    shutil.copy(saved, state)
    return True


def report(results, p: dict, tracker: Tracker, parent: str) -> int:
    """The table, the best config on the test set, the preset file, MLflow's parent run."""
    import pandas as pd

    key, out = p["key"], p["out"]
    trials = json.loads(p["record"].read_text())["trials"]
    rows = []
    for trial_id, t in trials.items():
        status = t.get("status", "?").lower()
        planned = int(t.get("config", {}).get("epochs", p["fixed"].get("epochs", p["max_t"])))
        if status == "finished" and t.get("epochs", 0) < min(planned, p["max_t"]):
            status = "stopped early"
        rows.append({"trial": trial_id, **t.get("config", {}), "val_acc": t.get("val_accuracy"), "status": status})
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}") if rows else "no trials ran")
    # Tune marks trials it stopped on an interrupt as terminated; the record knows better.
    done = sum(t.get("status") in ("FINISHED", "ERRORED") for t in trials.values())
    if done < p["num_samples"]:
        print(f"\nthe search stopped after {done} of {p['num_samples']} trials; continue it with "
              f"--resume --name {p['name']}")
        return 130
    try:
        best = results.get_best_result(p["metric"], p["mode"], scope="last", filter_nan_and_inf=True)
    except RuntimeError:
        best = None
    if best is None or best.checkpoint is None:
        tracker.finish(parent, "FAILED", tags={"status": "no trial finished"})
        print("no trial finished; see the errors above")
        return 1
    searched = {k: v for k, v in best.config.items() if k in p["space"]}
    config = make_config(key.method, key.budget, {**p["fixed"], **searched})
    preset_config = {f: getattr(config, f) for f in [*p["space"], *p["fixed"]]}
    val = float(best.metrics["val_accuracy"])
    test = evaluate_best(best, key, p["data_root"])
    preset = out / f"preset_{key.method}_{key.dataset}.json"
    preset.write_text(json.dumps({
        "method": key.method, "dataset": key.dataset, "pair": f"{key.teacher}:{key.student}",
        "budget": key.budget, "config": preset_config, "val_accuracy": val, "test_accuracy": test,
        "trial": best.metrics["trial_id"], "search": p["name"], "source": "orchestrator.tune"}, indent=2))
    tracker.log_params(parent, {f"best.{k}": v for k, v in preset_config.items()})
    tracker.log_metrics(parent, {"best_val_accuracy": val, "best_test_accuracy": test}, step=0)
    tracker.log_artifact(parent, preset)
    tracker.finish(parent, "FINISHED")
    print(f"\nbest trial {best.metrics['trial_id']}: {json.dumps(preset_config)}")
    print(f"validation accuracy {val:.2f}%, test accuracy {test:.2f}% (the test set is used only here)")
    print(f"preset: {preset}  (python -m orchestrator.bench --methods {key.method} --preset {preset})")
    print(f"browse the runs: {tracker.ui_command()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
