"""One-stage against two-stage adversarial rounds: the time of one DFAD round each way.

    python -m orchestrator.perf.one_stage                      # cpu budget: g_steps 1, kd_steps 5, batch 128
    python -m orchestrator.perf.one_stage --repeats 7 --method zskt

A two-stage round is a synthesis round (`g_steps` generator steps: generator, teacher and
student forward, backward to the generator) then `kd_steps` KD steps on fresh batches. A
one-stage round (`one_stage=true`) is `g_steps` joint steps (one forward and one backward
serve the generator step and a KD step) then `kd_steps - g_steps` KD steps. Both run through
the loop's own `InProcess` strategy on the same networks: Fashion-MNIST shapes, wrn16_2 ->
wrn16_1, randomly initialised (the time of a step does not depend on the weights). The two
kinds of round alternate, after a warm-up round each, and medians are reported, because
CPU timings here vary 20-30% from run to run. Per round it prints the seconds booked as
synthesis and as KD (docs/methods.md, "One-stage updates", says which is which), the total,
and the speed-up of one-stage.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def build(method: str, one_stage: bool, batch_size: int, kd_steps: int, g_steps: int):
    """An `InProcess` strategy of one cell, from the same random state either way."""
    from benchmarks.datasets import ImageSet, get_dataset_spec
    from methods import create_synthesizer, make_config, place
    from models import create_model
    from orchestrator.core.cell import image_spec
    from orchestrator.core.loop import InProcess, Trainer

    spec = image_spec("fashion-mnist")
    cfg = make_config(method, "cpu", {"one_stage": one_stage, "batch_size": batch_size,
                                      "synthesis_batch_size": batch_size, "kd_steps": kd_steps,
                                      "g_steps": g_steps, "ep_steps": max(kd_steps, 50)})
    torch.manual_seed(0)
    teacher = place(create_model("wrn16_2", 10, in_channels=1, image_size=32), "cpu").eval()
    student = place(create_model("wrn16_1", 10, in_channels=1, image_size=32), "cpu")
    unused = ImageSet(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                      get_dataset_spec("fashion-mnist"), "none")  # nothing is evaluated here
    synth = create_synthesizer(method, teacher, student, cfg, spec)
    return InProcess(synth, [Trainer(teacher, student, cfg, unused, spec)]), cfg


def round_seconds(strategy, cfg) -> tuple[float, float, float]:
    """(synthesis, KD, wall) seconds of one distilling round, as the round loop books them."""
    tick = time.perf_counter()
    if strategy.one_stage:
        out = strategy.joint_steps([0])
    else:
        out = strategy.synthesize(publish=False, feed_kd=True)
    ((_, kd),) = strategy.kd_round([0], cfg.kd_steps - out.joint_steps)
    wall = time.perf_counter() - tick
    joint_kd = out.joint_kd[0][1] if out.joint_steps else 0.0
    return out.seconds, kd + joint_kd + out.kd_sample_seconds, wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.one_stage",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="dfad", help="dfad or zskt (the methods with one-stage rounds)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of each kind (medians reported)")
    parser.add_argument("--batch-size", type=int, default=128, help="KD and synthesis batch (cpu budget: 128)")
    parser.add_argument("--kd-steps", type=int, default=5)
    parser.add_argument("--g-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    from methods import ConfigError

    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        two, cfg = build(args.method, False, args.batch_size, args.kd_steps, args.g_steps)
        one, _ = build(args.method, True, args.batch_size, args.kd_steps, args.g_steps)
    except (ConfigError, ValueError) as exc:  # a method without one_stage, g_steps > kd_steps, ...
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    times: dict[str, list[tuple[float, float, float]]] = {"two-stage": [], "one-stage": []}
    strategies = {"two-stage": two, "one-stage": one}
    for strategy in strategies.values():
        round_seconds(strategy, cfg)  # warm-up: allocator, oneDNN kernels
    for _ in range(args.repeats):  # alternate, so drift hits both alike
        for name, strategy in strategies.items():
            times[name].append(round_seconds(strategy, cfg))
    print(f"{args.method}, batch {args.batch_size}, g_steps {args.g_steps}, kd_steps {args.kd_steps}, "
          f"{args.threads} threads, median of {args.repeats} rounds each")
    print(f"{'round':<11}{'synth s':>9}{'KD s':>9}{'round s':>9}")
    median = {}
    for name, rows in times.items():
        synth, kd, wall = (statistics.median(column) for column in zip(*rows))
        median[name] = wall
        print(f"{name:<11}{synth:>9.3f}{kd:>9.3f}{wall:>9.3f}")
    print(f"speed-up of one-stage: {median['two-stage'] / median['one-stage']:.2f}x per round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
