"""Few-shot distillation by progressive network grafting: the NetGraft baseline of issue #15
(Shen et al., "Progressive Network Grafting for Few-Shot Knowledge Distillation", AAAI 2021).

    python -m orchestrator.netgraft --dataset fashion-mnist --guide real:10 --seeds 0,1,2 --out runs/netgraft
    python -m orchestrator.netgraft --guide real:10 --seeds 0,1,2,3,4 --resume   # only the seeds not done yet

The guide set (`--guide real:K` or `condensed:K`, orchestrator/core/guides.py) is used without
its labels: only the teacher's logits supervise. Student stages are grafted onto the teacher
one at a time (with 1x1 adapters), then connected and grafted together until the whole
student stands alone: a plain student (orchestrator/core/grafting.py, docs/methods.md). `--budget`:
`paper` (the authors' CIFAR-10 schedule), `cpu` (default: the same schedule, plus a
diagnostic score of each stage's hybrid; about 2.5 minutes per seed at K = 10 on one
thread), `smoke` (seconds). Outputs in --out:

    results.csv                  the bench's long format, one row per seed and metric, appended
                                 as each seed finishes (row NetGraft, method netgraft, mode = the guide)
    <cell>/student.pt            the student (a plain classifier checkpoint)
    <cell>/history.json          every stage's per-epoch loss, steps, seconds, hybrid accuracy
    mlflow.db, mlartifacts/      one MLflow run per seed (unless --tracking-uri points elsewhere)

`--resume` skips the seeds results.csv already holds as finished; without it a seed that
runs again replaces its rows. Bad input is one line and exit code 2, with nothing written.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.datasets import get_dataset_spec, list_datasets, load_split
from methods import place
from models import create_model
from orchestrator.bench import removed_if_refused
from orchestrator.report import mean_std
from orchestrator.cli import ArgumentParser, OutLock, UsageError, check_writable, parse_device, run_cli, split_list
from orchestrator.core.cell import CellKey, image_spec, load_teacher
from orchestrator.core.checkpoints import save_classifier
from orchestrator.core.classifiers import DEFAULT_DIR as DEFAULT_TEACHER_DIR
from orchestrator.core.classifiers import find_checkpoint, sha256
from orchestrator.core.grafting import BUDGETS, Graft, check_pair, run_graft
from orchestrator.core.guides import DEFAULT_SEED, GuideSet, load_guide, parse_guide
from orchestrator.core.training import evaluate
from orchestrator.report import LONG_COLUMNS, long_rows
from orchestrator.tracking import Tracker, check_tracking_uri, resolve_tracking_uri

METHOD, ROW = "netgraft", "NetGraft"
EVAL_SUBSET_SEED = 1234  # the fixed test images each stage's hybrid is scored on (diagnostic only)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m orchestrator.netgraft", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of {', '.join(list_datasets())}")
    p.add_argument("--guide", default="real:10", help="the few unlabeled samples: real:K or condensed:K per class")
    p.add_argument("--guide-seed", type=int, default=DEFAULT_SEED,
                   help=f"which K images real:K picks (default {DEFAULT_SEED}; the same set for every --seeds)")
    p.add_argument("--seeds", default="0", help="comma list of training seeds, e.g. 0,1,2")
    p.add_argument("--budget", default="cpu", help=f"one of {', '.join(BUDGETS)}")
    p.add_argument("--teacher", default="wrn16_2", help="a WideResNet teacher (default wrn16_2)")
    p.add_argument("--student", default="wrn16_1", help="a WideResNet student (default wrn16_1)")
    p.add_argument("--out", default="runs/netgraft", help="results folder")
    p.add_argument("--resume", action="store_true", help="skip the seeds results.csv holds as finished")
    p.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER_DIR), help="teacher checkpoint cache (as the bench)")
    p.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under --out)")
    p.add_argument("--experiment", default="dfkd-netgraft", help="MLflow experiment name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: batches this small gain little from a second "
                        "thread and lose much on a shared machine)")
    return p


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The checked run: everything read, nothing written yet."""

    dataset: str
    guide_spec: str
    guide: GuideSet
    seeds: list[int]
    budget: str
    teacher_arch: str
    student_arch: str
    teacher_path: Path
    teacher: torch.nn.Module
    teacher_meta: dict
    test: object  # ImageSet
    out: Path
    uri: str
    device: str

    def key(self, seed: int) -> CellKey:
        # NetGraft has no synthesis stream, so the long format's `mode` column carries the guide
        # set: it is what tells two NetGraft cells of a pair apart there. `guide` is the bench's
        # guide field (MLflow tag cell.guide).
        return CellKey(self.dataset, self.teacher_arch, self.student_arch, METHOD, seed, self.budget,
                       mode=self.guide_spec, guide=self.guide_spec)

    def cell_dir(self, seed: int) -> Path:
        kind, k = parse_guide(self.guide_spec)
        pair = f"{self.teacher_arch}-{self.student_arch}"
        return self.out / f"{self.dataset}_{pair}_{METHOD}_{kind}{k}_s{seed}_{self.budget}"

    @property
    def schedule(self):
        return BUDGETS[self.budget].for_k(parse_guide(self.guide_spec)[1])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_list(text, "seeds")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected integers like 0,1,2") from None
    if min(seeds) < 0:
        raise UsageError(f"--seeds {text!r}: seeds must be >= 0")
    return seeds


def make_plan(args) -> Plan:
    """Every check, in order from the cheapest; raises UsageError (or another user error)
    before anything is written to --out."""
    dataset = get_dataset_spec(args.dataset).name
    seeds = parse_seeds(args.seeds)
    if args.budget not in BUDGETS:
        raise UsageError(f"unknown budget '{args.budget}'; use one of {', '.join(BUDGETS)}")
    parse_guide(args.guide)
    if args.guide_seed < 0:
        raise UsageError(f"--guide-seed {args.guide_seed}: must be >= 0")
    device = parse_device(args.device)
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    spec = get_dataset_spec(dataset)
    models = {}
    for role, arch in (("teacher", args.teacher), ("student", args.student)):
        try:
            models[role] = create_model(arch, spec.num_classes, in_channels=spec.channels, image_size=spec.image_size)
        except ValueError as exc:
            raise UsageError(f"--{role} {arch}: cannot be built for {dataset}: {exc}") from None
    check_pair(models["teacher"], models["student"], args.teacher, args.student)
    out = Path(args.out).resolve()
    uri = resolve_tracking_uri(args.tracking_uri, out)
    test = load_split(dataset, "test", args.data_root)
    folder = str(test.source.resolve())  # every split read comes from this one folder
    guide = load_guide(args.guide, dataset, folder, seed=args.guide_seed, log=print)
    teacher_dir = Path(args.teacher_dir).resolve()
    teacher_path = find_checkpoint(teacher_dir, dataset, args.teacher)
    if teacher_path is None:
        raise UsageError(f"no {args.teacher} teacher for {dataset} in {teacher_dir}: train it first with python -m "
                         f"orchestrator.teachers --dataset {dataset} --arch {args.teacher} --out {teacher_dir}")
    teacher, meta = load_teacher(str(teacher_path.resolve()), dataset, device)
    if meta.get("arch") != args.teacher:
        raise UsageError(f"{teacher_path} holds a {meta.get('arch')}, not a {args.teacher}")
    existing = out / "results.csv"
    if existing.exists():
        read_results(existing)  # a file of another format is refused now, not after a seed
    with removed_if_refused(out):
        check_writable(out)
        check_tracking_uri(uri)
    return Plan(dataset, args.guide, guide, seeds, args.budget, args.teacher, args.student, teacher_path.resolve(),
                teacher, meta, test, out, uri, device)


# ---------------------------------------------------------------------------- results.csv
def read_results(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if columns and list(columns) != LONG_COLUMNS:
        raise UsageError(f"{path} is not a long-format results file (columns {columns}); use another --out")
    return rows


def same_cell(row: dict, key: CellKey) -> bool:
    return all(str(row.get(f)) == str(getattr(key, f)) for f in
               ("dataset", "teacher", "student", "method", "seed", "budget", "mode"))


def record_results(path: Path, key: CellKey, status: str, metrics: dict) -> None:
    """Replaces the cell's rows (if any) by these, keeping every other row; atomic."""
    rows = [r for r in read_results(path) if not same_cell(r, key)] if path.exists() else []
    rows += long_rows(key, status, metrics, row=ROW)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LONG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def finished_seeds(plan: Plan) -> dict[int, float]:
    """Seed -> accuracy of this plan's cells that results.csv holds as finished."""
    path = plan.out / "results.csv"
    if not path.exists():
        return {}
    done = {}
    for row in read_results(path):
        if row["metric"] == "accuracy" and row["status"] == "finished" and row["method"] == METHOD:
            seed = int(row["seed"])
            if same_cell(row, plan.key(seed)):
                done[seed] = float(row["value"])
    return done


# ------------------------------------------------------------------------------- one seed
def eval_subset(test, n: int):
    if n <= 0:
        return None
    if len(test) <= n:
        return test
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))
    return test.subset(order[:n].sort().values)


def run_seed(plan: Plan, seed: int, tracker: Tracker, log=print) -> tuple[str, float]:
    """One seed: graft, evaluate, write student.pt and history.json, append results.csv,
    record the MLflow run (ended FINISHED, FAILED or KILLED on every way out)."""
    from orchestrator.core.provenance import code_version

    key, cell_dir, schedule = plan.key(seed), plan.cell_dir(seed), plan.schedule
    started, cpu_started = time.perf_counter(), time.process_time()
    spec = get_dataset_spec(plan.dataset)
    provenance = {**code_version(), "teacher.sha256": sha256(plan.teacher_path), "data.folder": str(plan.test.source)}
    tags = {**key.tags(), **provenance, "netgraft.out": str(plan.out), "guide.spec": plan.guide_spec}
    params = {"schedule": dataclasses.asdict(schedule), "guide": plan.guide.identity, "teacher": plan.teacher_arch,
              "student": plan.student_arch, "budget": plan.budget, "seed": seed, "device": plan.device,
              "teacher_ckpt": str(plan.teacher_path)}
    run_id = tracker.start_parent(f"netgraft/{plan.dataset}/{plan.guide_spec}/s{seed}", params=params, tags=tags)
    status = "FAILED"
    try:
        log(f"[seed {seed}] {plan.teacher_arch} -> {plan.student_arch} on {plan.dataset}, guide {plan.guide_spec} "
            f"({len(plan.guide)} unlabeled images), budget {plan.budget}: {schedule}")
        torch.manual_seed(seed)
        student = place(create_model(plan.student_arch, spec.num_classes, in_channels=spec.channels,
                                     image_size=spec.image_size), plan.device)
        graft = place(Graft(plan.teacher, student), plan.device)
        images = plan.guide.images.to(plan.device)
        outcome = "finished"
        try:
            records = run_graft(graft, images, image_spec(plan.dataset), schedule,
                                eval_subset(plan.test, schedule.eval_images), log=log)
        except FloatingPointError as exc:
            outcome, records = f"failed: {exc}", []
        accuracy = evaluate(student, plan.test, plan.device) if outcome == "finished" else float("nan")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        metrics = {"accuracy": accuracy, "teacher_accuracy": float(plan.teacher_meta.get("accuracy", math.nan)),
                   "wall_seconds": wall, "cpu_seconds": cpu}
        cell_dir.mkdir(parents=True, exist_ok=True)
        history = {"cell": key.as_dict(), "status": outcome, "guide": plan.guide.identity,
                   "schedule": dataclasses.asdict(schedule), "teacher_ckpt": str(plan.teacher_path),
                   "provenance": provenance, "stages": [dataclasses.asdict(r) for r in records], **metrics}
        (cell_dir / "history.json").write_text(json.dumps(history, indent=2))
        if outcome == "finished":
            save_classifier(cell_dir / "student.pt", student, {
                "dataset": plan.dataset, "arch": plan.student_arch, "num_classes": spec.num_classes,
                "channels": spec.channels, "image_size": spec.image_size, "mean": list(spec.mean),
                "std": list(spec.std), "accuracy": accuracy, "distilled_from": plan.teacher_arch, "method": METHOD,
                "guide": plan.guide_spec, "seed": seed})
        record_results(plan.out / "results.csv", key, outcome, metrics)
        step = 0
        for r in records:
            for loss in r.loss:
                step += 1
                tracker.log_metrics(run_id, {f"loss/{r.name.replace(' ', '_')}": loss}, step=step)
            if r.hybrid_accuracy is not None:
                tracker.log_metrics(run_id, {f"hybrid_accuracy/{r.name.replace(' ', '_')}": r.hybrid_accuracy},
                                    step=step)
        tracker.log_metrics(run_id, metrics, step=step)
        for name in ("history.json", "student.pt"):
            if (cell_dir / name).exists():
                tracker.log_artifact(run_id, cell_dir / name)
        status = "FINISHED" if outcome == "finished" else "FAILED"
        log(f"[seed {seed}] {outcome}: student accuracy {accuracy:.2f}% (teacher "
            f"{metrics['teacher_accuracy']:.2f}%) in {wall:.0f}s ({cpu:.0f} CPU-s); {cell_dir}")
        return outcome, accuracy
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(run_id, status, tags={"status": {"FINISHED": "finished", "KILLED": "interrupted"}.get(
            status, "failed")})


def summary(values: list[float]) -> str:
    if not values:
        return "no finished seed"
    return f"{mean_std(values)} over {len(values)} seeds"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    torch.set_num_threads(args.threads)
    failed = 0
    with OutLock(plan.out, "netgraft", print):
        done = finished_seeds(plan) if args.resume else {}
        todo = [s for s in plan.seeds if s not in done or not (plan.cell_dir(s) / "student.pt").exists()]
        for seed in plan.seeds:
            if seed not in todo:
                print(f"[seed {seed}] finished earlier ({done[seed]:.2f}%): skipped")
        tracker = Tracker(plan.uri, args.experiment, artifact_root=plan.out / "mlartifacts") if todo else None
        if tracker and args.resume and (closed := tracker.close_abandoned("netgraft.out", str(plan.out))):
            print(f"marked {closed} run(s) KILLED that a netgraft which died had left RUNNING")
        for seed in todo:
            outcome, _ = run_seed(plan, seed, tracker)
            failed += outcome != "finished"
    done = finished_seeds(plan)
    accs = [done[s] for s in plan.seeds if s in done]
    print(f"NetGraft {plan.teacher_arch}->{plan.student_arch} on {plan.dataset}, guide {plan.guide_spec}, "
          f"budget {plan.budget}: {summary(accs)}; results in {plan.out / 'results.csv'}")
    if tracker:
        print(f"browse the runs: {tracker.ui_command()}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
