"""Where a cell's time goes, in one process (`distill`) and on Ray (`bench`), side by side.

    python -m orchestrator.perf.cell_anatomy                                 # deepinv, cpu budget, 1 epoch
    python -m orchestrator.perf.cell_anatomy --method cmi --set epochs=2
    python -m orchestrator.perf.cell_anatomy --set epochs=3      # + the steady state after epoch 1

Runs the same cell twice on Fashion-MNIST, wrn16_2 -> wrn16_1, with the teacher cache
(the shipped teacher when there is none): once through the in-process strategy and once
through the Ray strategy on a local Ray. It splits each wall time into start-up (loading,
building, starting actors), synthesis, KD (on Ray: with the store traffic of the KD
batches), evaluation, checkpointing, and the rest, then prints the bench/distill ratio of
each part and of the KD time per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("startup_seconds", "synthesis_seconds", "kd_seconds", "eval_seconds", "checkpoint_seconds")


def anatomy(result, invocation: float) -> dict[str, float]:
    s = result.summary()
    parts = {k: float(s[k]) for k in PARTS}
    parts["other_seconds"] = s["wall_seconds"] - sum(parts.values())
    parts["wall_seconds"] = s["wall_seconds"]
    parts["invocation_seconds"] = invocation
    h = result.history  # cumulative per epoch: the steady state is everything after epoch 1
    parts["later_synthesis"] = h.synthesis_seconds[-1] - h.synthesis_seconds[0]
    parts["later_kd"] = h.kd_seconds[-1] - h.kd_seconds[0]
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.cell_anatomy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="deepinv")
    parser.add_argument("--budget", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--teacher-dir", default=None)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    from orchestrator.cli import UsageError, parse_sets
    from orchestrator.core.cell import CellKey, CellSpec, check_cell, run_in_process
    from orchestrator.core.classifiers import DEFAULT_DIR, find_checkpoint

    try:
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
    import ray
    import torch

    from orchestrator.runtime.cluster import start_ray
    from orchestrator.runtime.driver import Resources, Stream, StreamRunner

    out = Path(tempfile.mkdtemp(prefix="cell_anatomy_"))
    rows = {}
    # The bench first: a driver that has just run torch work itself competes with its own
    # actors for a while (measured: 1.3-1.7x slower steps in the bench run after `distill`).
    tick = time.perf_counter()
    start_ray(None)
    (result,) = StreamRunner(Stream([spec]), out / "bench", Resources(1.0, 0.0, os.cpu_count() or 1), "cpu",
                             log=lambda *_: None).run()
    ray.shutdown()
    rows["bench"] = anatomy(result, time.perf_counter() - tick)
    tick = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    result = run_in_process(spec, out / "distill", "cpu", resume=False, log=lambda *_: None)
    rows["distill"] = anatomy(result, time.perf_counter() - tick)
    steps = spec.config.epochs * spec.config.ep_steps
    print(f"{args.method}, {args.budget} budget, {spec.config.epochs} epoch(s), {steps} KD steps; seconds:")
    print(f"{'part':<20}{'distill':>10}{'bench':>10}{'ratio':>8}")
    for part in (*PARTS, "other_seconds", "wall_seconds", "invocation_seconds"):
        a, b = rows["distill"][part], rows["bench"][part]
        print(f"{part.removesuffix('_seconds'):<20}{a:>10.1f}{b:>10.1f}{(b / a if a > 0 else float('nan')):>8.2f}")
    kd_a, kd_b = rows["distill"]["kd_seconds"] / steps, rows["bench"]["kd_seconds"] / steps
    print(f"{'KD s/step':<20}{kd_a:>10.3f}{kd_b:>10.3f}{kd_b / kd_a:>8.2f}")
    if spec.config.epochs > 1:
        # A fresh actor pays its one-time costs (oneDNN kernel creation, first allocations)
        # in its first steps; a distill run has paid most of them in its synthesis already.
        later = (spec.config.epochs - 1) * spec.config.ep_steps
        kd_a, kd_b = rows["distill"]["later_kd"] / later, rows["bench"]["later_kd"] / later
        print(f"{'KD s/step, epoch 2+':<20}{kd_a:>10.3f}{kd_b:>10.3f}{kd_b / kd_a:>8.2f}")
        sy_a, sy_b = rows["distill"]["later_synthesis"], rows["bench"]["later_synthesis"]
        print(f"{'synthesis, epoch 2+':<20}{sy_a:>10.1f}{sy_b:>10.1f}{sy_b / sy_a:>8.2f}")
    outside = {k: 1 - (r["synthesis_seconds"] + r["kd_seconds"]) / r["wall_seconds"] for k, r in rows.items()}
    print(f"outside synthesis and KD: distill {outside['distill']:.1%}, bench {outside['bench']:.1%} of the cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
