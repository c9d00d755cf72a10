"""How fast a student is scored on the test split, by batch size.

    python -m orchestrator.perf.eval_speed                      # wrn16_1, fashion-mnist, 2 threads, batches 1000 128 64
    python -m orchestrator.perf.eval_speed --arch wrn16_2 --batches 256,128
    python -m orchestrator.perf.eval_speed --batches 128 --rounds 5    # plain, folded, inference copy, alternating

Times `orchestrator.core.training.evaluate` (inference mode, channels_last weights as in
training) on the whole split, after one warm-up pass per batch size, and prints seconds,
images/s and the speed-up over the first batch size; then, at the last batch size, the
plain model (`fold=False`), the BN-folded copy (models/fold.py) and the inference copy
evaluate scores by default (models/fuse.py), in alternating rounds, with their accuracies. The weights are random: the time of a
pass does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.eval_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="wrn16_1")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1000,128,64")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of plain against folded")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.datasets import load_split
    from methods.base import place
    from models import create_model
    from orchestrator.cli import UsageError
    from orchestrator.core.training import evaluate

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UsageError(f"--batches {args.batches!r}: expected a comma list of integers, e.g. 1000,128") from None
    if args.threads < 1 or args.rounds < 1 or any(b < 1 for b in batches):
        raise UsageError("--threads, --rounds and every --batches value must be at least 1")
    torch.set_num_threads(args.threads)
    test = load_split(args.dataset, "test", args.data_root)
    try:
        model = create_model(args.arch, num_classes=test.spec.num_classes, in_channels=test.spec.channels)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--arch {args.arch}: {exc}") from None
    model = place(model, "cpu")
    print(f"{args.arch} on {len(test)} images from {test.source}, {args.threads} threads")
    first = None
    for batch in batches:
        evaluate(model, test, batch_size=batch)  # warm-up
        tick = time.perf_counter()
        evaluate(model, test, batch_size=batch)
        seconds = time.perf_counter() - tick
        first = first or seconds
        print(f"batch {batch:5d}: {seconds:6.2f} s  {len(test) / seconds:7.0f} img/s  {first / seconds:4.2f}x")
    # The three ways to score, each timed with the making of its copy: the model as it is,
    # the BN-folded copy (models/fold.py), the inference copy evaluate uses (models/fuse.py).
    from models import fold_batchnorm
    ways = {"plain": lambda: evaluate(model, test, batch_size=batches[-1], fold=False),
            "folded": lambda: evaluate(fold_batchnorm(model), test, batch_size=batches[-1], fold=False),
            "inference copy": lambda: evaluate(model, test, batch_size=batches[-1])}
    times: dict[str, list[float]] = {name: [] for name in ways}
    accuracy = {}
    for _ in range(args.rounds):
        for name, way in ways.items():
            tick = time.perf_counter()
            accuracy[name] = way()
            times[name].append(time.perf_counter() - tick)
    plain = statistics.median(times["plain"])
    print(f"batch {batches[-1]:5d}, median of {args.rounds} alternating rounds:")
    for name in ways:
        seconds = statistics.median(times[name])
        print(f"  {name:15s} {seconds:.2f} s ({accuracy[name]:.2f}%): {plain / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    from orchestrator.cli import run_cli

    run_cli(main)
