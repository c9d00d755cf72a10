"""Where a cell's time goes, in one process (`distill`) and on Ray (`bench`), side by side.

    python -m orchestrator.perf.cell_anatomy                                 # deepinv, cpu budget, 1 epoch
    python -m orchestrator.perf.cell_anatomy --method cmi --set epochs=2
    python -m orchestrator.perf.cell_anatomy --set epochs=2 --pairs 3       # ratios as mean ± std of 3 pairs

Runs the same cell through the in-process strategy and through the Ray strategy on a local
Ray, on Fashion-MNIST, wrn16_2 -> wrn16_1, with the teacher cache (the shipped teacher when
there is none). Each run is a process of its own, and the pairs alternate their order
(distill first, then bench first, ...), so neither path inherits the other's warm caches or
spinning threads, and a slow minute of a shared CPU falls on both paths alike. It splits
each wall time into start-up (loading, building, starting actors), synthesis, KD (on Ray:
with the store traffic of the KD batches), evaluation, checkpointing, and the rest, then
prints the bench/distill ratio of each part and of the KD time per step: the ratio of each
pair, then their mean ± std (CPU timings here vary 20-30% run to run; one pair is one sample).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("startup_seconds", "synthesis_seconds", "kd_seconds", "eval_seconds", "checkpoint_seconds")
PATHS = ("distill", "bench")


def anatomy(result, invocation: float, steps: int, later_steps: int) -> dict[str, float]:
    s = result.summary()
    parts = {k: float(s[k]) for k in PARTS}
    parts["other_seconds"] = s["wall_seconds"] - sum(parts.values())
    parts["wall_seconds"] = s["wall_seconds"]
    parts["invocation_seconds"] = invocation
    parts["kd_per_step"] = parts["kd_seconds"] / steps
    h = result.history  # cumulative per epoch: the steady state is everything after epoch 1
    if later_steps:
        # A fresh actor pays its one-time costs (oneDNN kernel creation, first allocations)
        # in its first steps; a distill run has paid most of them in its synthesis already.
        parts["kd_per_step_epoch_2+"] = (h.kd_seconds[-1] - h.kd_seconds[0]) / later_steps
        parts["synthesis_epoch_2+"] = h.synthesis_seconds[-1] - h.synthesis_seconds[0]
    parts["outside_share"] = 1 - (parts["synthesis_seconds"] + parts["kd_seconds"]) / parts["wall_seconds"]
    return parts


def run_path(path: str, spec) -> dict[str, float]:
    """One cell through one strategy, in this process."""
    import torch

    steps = spec.config.epochs * spec.config.ep_steps
    later = (spec.config.epochs - 1) * spec.config.ep_steps
    with tempfile.TemporaryDirectory(prefix=f"cell_anatomy_{path}_") as tmp:  # the cell's files are not kept
        out = Path(tmp)
        tick = time.perf_counter()
        if path == "bench":
            import ray

            from orchestrator.runtime.cluster import start_ray
            from orchestrator.runtime.driver import Resources, Stream, StreamRunner
            start_ray(None)
            (result,) = StreamRunner(Stream([spec]), out, Resources(1.0, 0.0, os.cpu_count() or 1), "cpu",
                                     log=lambda *_: None).run()
            ray.shutdown()
        else:
            from orchestrator.core.cell import run_in_process
            torch.set_num_threads(os.cpu_count() or 1)
            result = run_in_process(spec, out, "cpu", resume=False, log=lambda *_: None)
        return anatomy(result, time.perf_counter() - tick, steps, later)


def mean_std(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):  # a part one path never has (e.g. no checkpoint)
        return "-"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(pairs: list[dict[str, dict]], header: str) -> None:
    print(header)
    n = len(pairs)
    print(f"{'part':<22}{'distill':>10}{'bench':>10}   bench/distill per pair" + ("" if n == 1 else ", mean ± std"))
    names = [*PARTS, "other_seconds", "wall_seconds", "invocation_seconds", "kd_per_step"]
    names += [k for k in ("kd_per_step_epoch_2+", "synthesis_epoch_2+") if k in pairs[0]["distill"]]
    for name in names:
        a = [p["distill"][name] for p in pairs]
        b = [p["bench"][name] for p in pairs]
        ratios = [y / x if x > 0 else float("nan") for x, y in zip(a, b)]
        digits = 3 if "per_step" in name else 1
        label = (name.removesuffix("_seconds").replace("kd_per_step", "KD s/step")
                 .replace("_epoch_2+", ", epoch 2+"))
        cells = " ".join(f"{r:.2f}" for r in ratios) + ("" if n == 1 else f"   {mean_std(ratios)}")
        print(f"{label:<22}{statistics.fmean(a):>10.{digits}f}{statistics.fmean(b):>10.{digits}f}   {cells}")
    share = {path: [p[path]["outside_share"] for p in pairs] for path in PATHS}
    print("outside synthesis and KD: " + ", ".join(
        f"{path} {statistics.fmean(v):.1%}" + ("" if n == 1 else f" ± {statistics.stdev(v):.1%}")
        for path, v in share.items()) + " of the cell")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.cell_anatomy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="deepinv")
    parser.add_argument("--budget", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--teacher-dir", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--pairs", type=int, default=1, help="alternating distill/bench pairs (default 1)")
    parser.add_argument("--only", choices=PATHS, help=argparse.SUPPRESS)  # one run, a JSON line: the pairs' worker
    args = parser.parse_args(argv)
    from orchestrator.cli import UsageError, parse_sets
    from orchestrator.core.cell import CellKey, CellSpec, check_cell
    from orchestrator.core.classifiers import DEFAULT_DIR, find_checkpoint

    try:
        if args.pairs < 1:
            raise UsageError(f"--pairs {args.pairs}: give 1 or more")
        overrides = {"epochs": "1", **parse_sets(args.set)}
        key = CellKey("fashion-mnist", "wrn16_2", "wrn16_1", args.method, 0, args.budget)
        check_cell(key, overrides)  # before anything is read or copied
        teacher = find_checkpoint(Path(args.teacher_dir or DEFAULT_DIR), "fashion-mnist", "wrn16_2")
        if teacher is None:
            raise UsageError("no fashion-mnist wrn16_2 teacher: run python -m orchestrator.teachers first")
        spec = CellSpec.build(key, overrides, teacher, args.data_root)
    except Exception as exc:  # unknown method, bad value, missing data: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        print(json.dumps(run_path(args.only, spec)), flush=True)
        return 0

    # The same arguments for every worker; pair i runs distill first when i is even.
    worker = [sys.executable, "-m", "orchestrator.perf.cell_anatomy", "--method", args.method,
              "--budget", args.budget, *(x for s in args.set for x in ("--set", s))]
    for flag, value in (("--teacher-dir", args.teacher_dir), ("--data-root", args.data_root)):
        worker += [flag, value] if value else []
    pairs = []
    for i in range(args.pairs):
        pair = {}
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            done = subprocess.run([*worker, "--only", path], stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                print(f"error: the {path} run of pair {i + 1} failed (exit {done.returncode})", file=sys.stderr)
                return 1
            pair[path] = json.loads(done.stdout.strip().splitlines()[-1])
        pairs.append(pair)
        print(f"pair {i + 1}/{args.pairs}: KD s/step distill {pair['distill']['kd_per_step']:.3f}, "
              f"bench {pair['bench']['kd_per_step']:.3f}", file=sys.stderr, flush=True)
    steps = spec.config.epochs * spec.config.ep_steps
    report(pairs, f"{args.method}, {args.budget} budget, {spec.config.epochs} epoch(s), {steps} KD steps, "
                  f"{args.pairs} pair(s) in alternating order; seconds (means):")
    return 0


if __name__ == "__main__":
    sys.exit(main())
